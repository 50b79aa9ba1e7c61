//! The `gateway` binary: parse the configuration (exit 64 on a bad value), set up logging,
//! run the node.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let config = gateway::config::Config::from_args();
    gateway::telemetry::init(config.log_format == "json");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(gateway::run(config))
}
