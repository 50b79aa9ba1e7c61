//! The command connection of the Redis backends: one multiplexed connection to a single Redis,
//! or a cluster connection that routes each command to the master of its key's hash slot —
//! one type, so every command, script and pipeline is written once for both.
//!
//! What the callers keep to, so that everything they send runs on a cluster too: every script
//! and every pipeline touches the keys of one hash slot (one room's `{r:…}`, one user's
//! `{u:…}`, one index partition's `{px:…}`); work on several slots goes out as separate
//! requests in flight together.

use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::sharded::slot_of;

#[derive(Clone)]
pub enum Commands {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use (a node starts before its cluster answers, as it
/// does before a single Redis answers); a failed attempt is tried again by the next command.
/// Once made, redis-rs follows MOVED and reconnects to the nodes by itself.
pub struct LazyCluster {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    pub fn new(client: ClusterClient) -> LazyCluster {
        LazyCluster {
            client,
            connection: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl Commands {
    /// Runs `cmd` on the master serving `slot_key`'s hash slot (a command without keys, such
    /// as `WAIT`, that must reach the node a write went to). On a single Redis: the one
    /// connection, which carried that write.
    pub async fn on_master_of(&mut self, slot_key: &str, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Commands::Single(con) => cmd.query_async(con).await,
            Commands::Cluster(lazy) => {
                let slot = slot_of(slot_key);
                let route = Route::new(slot, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                lazy.get().await?.route_command(cmd, routing).await
            }
        }
    }
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(con) => con.req_packed_command(cmd),
            Commands::Cluster(lazy) => {
                let lazy = lazy.clone();
                Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(con) => con.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(lazy) => {
                let lazy = lazy.clone();
                Box::pin(async move {
                    let mut con = lazy.get().await?;
                    con.req_packed_commands(pipeline, offset, count).await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(con) => con.get_db(),
            Commands::Cluster(_) => 0, // a cluster has database 0 only
        }
    }
}
