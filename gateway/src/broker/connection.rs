//! The command connection of the Redis backends: one multiplexed connection to a single Redis,
//! or a cluster connection that routes each command to the master of its key's hash slot —
//! one type, so every command, script and pipeline is written once for both.
//!
//! What the callers keep to, so that everything they send runs on a cluster too: every script
//! and every pipeline touches the keys of one hash slot (one room's `{r:…}`, one user's
//! `{u:…}`, one index partition's `{px:…}`); work on several slots goes out as separate
//! requests in flight together.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

#[derive(Clone)]
pub enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Commands {
    /// Runs `cmd` on the master serving `slot_key`'s hash slot (a command without keys, such
    /// as `WAIT`, that must reach the node a write went to). On a single Redis: the one
    /// connection, which carried that write.
    pub async fn on_master_of(&mut self, slot_key: &str, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Commands::Single(con) => cmd.query_async(con).await,
            Commands::Cluster(con) => {
                let slot = slot_of(slot_key);
                let route = Route::new(slot, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                con.route_command(cmd, routing).await
            }
        }
    }
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(con) => con.req_packed_command(cmd),
            Commands::Cluster(con) => con.req_packed_command(cmd),
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
            Commands::Cluster(con) => con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(con) => con.get_db(),
            Commands::Cluster(con) => con.get_db(),
        }
    }
}

/// The hash slot of a key (CRC16 of its `{hash tag}`, or of the whole key), as Redis Cluster
/// computes it.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16_xmodem(tagged.unwrap_or(bytes)) % 16384
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // `CLUSTER KEYSLOT` answers of Redis 7.0.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("123456789"), 12739);
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
        assert_eq!(slot_of("gw:{r:lobby}:s"), slot_of("r:lobby"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(slot_of("foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
    }
}
