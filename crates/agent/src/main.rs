//! `slipway-agent`: the reference agent. All of it lives in this package's library
//! (`slipway_agent::cli` is the command line); the binary is built here, not by the root
//! package, so `cargo build -p slipway-agent` builds neither the server nor the AWS SDK.

fn main() -> std::process::ExitCode {
    slipway_agent::cli::main()
}
