"""moto's server mode with the behaviours of EBS and EC2 that the Slipway tests need and moto
lacks: a snapshot of a volume holds that volume's data, a volume created from a snapshot holds
the snapshot's data, and a registered image keeps the block device mappings and boot mode it
was registered with.

moto records CreateSnapshot(s) as metadata only, so the EBS direct APIs (ListSnapshotBlocks,
GetSnapshotBlock) know nothing of such a snapshot, and a test cannot check what a restore
point's snapshots contain. In the tests, an emulated attachment has no block device: the server
maps each volume id to the file `<SLIPWAY_MOTO_DEVICE_DIR>/<volume-id>.img`
(`slipway_aws::FileMap`). Here, when EC2 accepts a snapshot of a volume that has such a file,
the file is read at that moment, as EBS fixes a snapshot's point in time when the call is
accepted, and its non-zero 512 KiB blocks are registered with moto's EBS direct service, with
their SHA-256 checksums, as EBS would list them. When EC2 creates a volume from such a
snapshot, the volume's file is written with the snapshot's blocks (a sparse file of the
volume's size), so a test can attach it, change it and snapshot it again (the launch
conversion does). moto's RegisterImage keeps only a name and a description and describes every
image with a snapshot of its own and `uefi`: here it keeps the request's root device name,
block device mappings, architecture and boot mode, and DescribeImages returns them, so a test
can check which snapshots an image boots from; and DeleteSnapshot of a snapshot a registered
image maps fails with `InvalidSnapshot.InUse`, as on EC2, so a test sees an image that pins its
snapshots. Everything else is moto as shipped.

    python3 moto_server.py [moto_server arguments]      (SLIPWAY_MOTO_DEVICE_DIR in the env)
"""

import base64
import hashlib
import os
import sys

from moto.ebs.models import EBSSnapshot, ebs_backends
from moto.ec2.exceptions import InvalidSnapshotInUse
from moto.ec2.models.amis import Ami
from moto.ec2.models.elastic_block_store import EBSBackend as Ec2Ebs
from moto.ec2.responses.amis import AmisResponse
from moto.server import main

BLOCK = 512 * 1024
ZERO = bytes(BLOCK)
DEVICE_DIR = os.environ.get("SLIPWAY_MOTO_DEVICE_DIR", "")
# Blocks by digest: the snapshots of a test share their unchanged blocks, as EBS's do.
_blocks: dict[bytes, bytes] = {}


def _capture(volume_id: str, snapshot: EBSSnapshot) -> bool:
    path = os.path.join(DEVICE_DIR, volume_id + ".img") if DEVICE_DIR else ""
    if not path or not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            # Holes read as zeros: skip them (the volumes are sparse files of a GiB or more).
            try:
                data_at = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            off = data_at - data_at % BLOCK
            data = os.pread(fd, BLOCK, off)
            if len(data) < BLOCK:
                data += bytes(BLOCK - len(data))
            if data != ZERO:
                digest = hashlib.sha256(data).digest()
                data = _blocks.setdefault(digest, data)
                snapshot.put_block(
                    off // BLOCK,
                    data,
                    base64.b64encode(digest).decode(),
                    "SHA256",
                    BLOCK,
                )
            off += BLOCK
    finally:
        os.close(fd)
    return True


_create_snapshot = Ec2Ebs.create_snapshot
_delete_snapshot = Ec2Ebs.delete_snapshot


def create_snapshot(self, volume_id, description, owner_id=None, from_ami=None):  # type: ignore[no-untyped-def]
    snap = _create_snapshot(self, volume_id, description, owner_id, from_ami)
    ebs = EBSSnapshot(account_id=self.account_id, snapshot=snap)
    ebs.block_size = BLOCK
    if _capture(volume_id, ebs):
        ebs.status = "completed"
        ebs_backends[self.account_id][self.region_name].snapshots[snap.id] = ebs
    return snap


def delete_snapshot(self, snapshot_id):  # type: ignore[no-untyped-def]
    # EC2 refuses to delete a snapshot that a registered image maps (moto only knows the
    # images it made itself with CreateImage).
    for ami in self.amis.values():
        for m in getattr(ami, "slipway_mappings", None) or []:
            if (m.get("Ebs") or {}).get("SnapshotId") == snapshot_id:
                raise InvalidSnapshotInUse(snapshot_id, ami.id)
    snap = _delete_snapshot(self, snapshot_id)
    ebs_backends[self.account_id][self.region_name].snapshots.pop(snapshot_id, None)
    return snap


_create_volume = Ec2Ebs.create_volume


def _restore(snapshot_id: str, volume_id: str, size_gib: int, account_id: str, region: str) -> None:
    ebs = ebs_backends[account_id][region].snapshots.get(snapshot_id)
    if not DEVICE_DIR or ebs is None:
        return
    path = os.path.join(DEVICE_DIR, volume_id + ".img")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size_gib << 30)
        for index, block in ebs.blocks.items():
            os.pwrite(fd, block.block_data, index * BLOCK)
    finally:
        os.close(fd)


def create_volume(self, size, zone_name, snapshot_id=None, *args, **kwargs):  # type: ignore[no-untyped-def]
    vol = _create_volume(self, size, zone_name, snapshot_id, *args, **kwargs)
    if snapshot_id:
        _restore(snapshot_id, vol.id, int(vol.size), self.account_id, self.region_name)
    return vol


_bdm_property = Ami.block_device_mappings


def block_device_mappings(self):  # type: ignore[no-untyped-def]
    registered = getattr(self, "slipway_mappings", None)
    return registered if registered is not None else _bdm_property.fget(self)


_register_image = AmisResponse.register_image


def register_image(self):  # type: ignore[no-untyped-def]
    result = _register_image(self)
    ami = self.ec2_backend.amis.get(result.result["ImageId"])
    if ami is not None:
        mappings = []
        for m in self._get_param("BlockDeviceMappings", []):
            ebs = m.get("Ebs") or {}
            mappings.append(
                {
                    "DeviceName": m.get("DeviceName"),
                    "Ebs": {
                        "SnapshotId": ebs.get("SnapshotId"),
                        "VolumeSize": ebs.get("VolumeSize"),
                        "DeleteOnTermination": ebs.get("DeleteOnTermination", False),
                        "VolumeType": ebs.get("VolumeType", "standard"),
                    },
                }
            )
        if mappings:
            ami.slipway_mappings = mappings
        for param, attr in [
            ("RootDeviceName", "root_device_name"),
            ("BootMode", "boot_mode"),
            ("Architecture", "architecture"),
            ("VirtualizationType", "virtualization_type"),
        ]:
            value = self._get_param(param)
            if value:
                setattr(ami, attr, value)
        if not self._get_param("BootMode"):
            # EC2 leaves an image registered without a boot mode without one (instances then
            # boot as their type's default); moto's `uefi` default would hide that.
            ami.boot_mode = None
    return result


Ec2Ebs.create_snapshot = create_snapshot
Ec2Ebs.delete_snapshot = delete_snapshot
Ec2Ebs.create_volume = create_volume
Ami.block_device_mappings = property(block_device_mappings)
AmisResponse.register_image = register_image

if __name__ == "__main__":
    main(sys.argv[1:])
