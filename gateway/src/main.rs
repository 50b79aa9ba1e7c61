//! The `gateway` binary: `gateway token …` mints a JWT; otherwise parse the configuration (exit
//! 64 on a bad value), set up logging and tracing, run the node.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("token") {
        std::process::exit(gateway::auth::TokenCommand::run(std::env::args().skip(1)));
    }
    let config = gateway::config::Config::from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let node_id = config.node_id();
        let config = gateway::config::Config {
            node_id: Some(node_id.clone()),
            ..config
        };
        let _telemetry = gateway::telemetry::init(config.log_format == "json", &node_id);
        gateway::run(config).await
    })
}
