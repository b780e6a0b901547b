//! `shiva-shim`: the run shim as a small program of its own (see `shiva_node::shim`), started by
//! `shiva-node` as `shiva-shim __shim`, one per run, its configuration on stdin. It links none
//! of the node's runtime (no async runtime, no Kafka client), so each supervised task costs
//! little memory, and it outlives a node that is upgraded or restarted.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|arg| arg.to_str()) {
        Some(shiva_node::shim::SHIM_ARG) => ExitCode::from(shiva_node::shim::main(None)),
        Some("--version") => {
            println!("shiva-shim {} (protocol {})", env!("CARGO_PKG_VERSION"), shiva_node::shim::PROTOCOL);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "shiva-shim: started by shiva-node only, as `shiva-shim {}` with its configuration on stdin",
                shiva_node::shim::SHIM_ARG
            );
            ExitCode::from(2)
        }
    }
}
