//! The EBS direct APIs end to end through the real SDK and moto's EBS service. moto keeps
//! blocks and their checksums but validates nothing, which lets a corrupt block be stored.

use aws_sdk_ebs::types::ChecksumAlgorithm;
use aws_smithy_types::byte_stream::ByteStream;
use sha2::{Digest, Sha256};
use slipway_backend::SnapshotBackend;

use crate::support::{fast_settings, MotoEnv};

const BLOCK: usize = 512 * 1024;

fn block(seed: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

/// A snapshot of a 1 GiB volume with `blocks` written through StartSnapshot/PutSnapshotBlock;
/// `checksum_of` gives the data whose checksum is sent with each block.
async fn snapshot_with(
    env: &MotoEnv,
    blocks: &[(i32, Vec<u8>)],
    checksum_of: impl Fn(i32, &[u8]) -> Vec<u8>,
) -> String {
    let ebs = aws_sdk_ebs::Client::new(&env.sdk);
    let sid = ebs
        .start_snapshot()
        .volume_size(1)
        .send()
        .await
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_string();
    for (i, data) in blocks {
        let sum = Sha256::digest(checksum_of(*i, data));
        ebs.put_snapshot_block()
            .snapshot_id(&sid)
            .block_index(*i)
            .block_data(ByteStream::from(data.clone()))
            .data_length(BLOCK as i32)
            .checksum(aws_smithy_types::base64::encode(sum))
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .send()
            .await
            .unwrap();
    }
    ebs.complete_snapshot()
        .snapshot_id(&sid)
        .changed_blocks_count(blocks.len() as i32)
        .send()
        .await
        .unwrap();
    sid
}

#[tokio::test]
async fn block_hashes_through_the_emulator() {
    let env = MotoEnv::start().await;
    let blocks = vec![(0, block(3)), (5, block(7)), (2047, block(11))];
    let sid = snapshot_with(&env, &blocks, |_, d| d.to_vec()).await;
    let b = env.backend(fast_settings()).await;
    let hashes = b.block_hashes(&sid).await.unwrap();
    let expected: Vec<(u64, String)> = blocks
        .iter()
        .map(|(i, d)| (*i as u64, hex::encode(Sha256::digest(d))))
        .collect();
    assert_eq!(hashes, expected);
}

#[tokio::test]
async fn a_stored_block_with_a_wrong_checksum_is_caught() {
    let env = MotoEnv::start().await;
    let blocks = vec![(1, block(3)), (4, block(5))];
    let sid = snapshot_with(
        &env,
        &blocks,
        |i, d| {
            if i == 4 {
                block(6)
            } else {
                d.to_vec()
            }
        },
    )
    .await;
    let b = env.backend(fast_settings()).await;
    let err = b.block_hashes(&sid).await.unwrap_err();
    assert!(err.to_string().contains("block 4"), "{err}");
}
