//! `slipway-agent`: the reference agent. All of it lives in the `slipway-agent` library.

fn main() -> std::process::ExitCode {
    slipway_agent::cli::main()
}
