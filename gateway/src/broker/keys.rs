//! Names of every broker key and channel. Keys of one room (or one user) share a hash tag
//! (`{r:…}` / `{u:…}`) so they would stay on one Redis Cluster slot.
//!
//! The Lua scripts in `scripts/` build some of these names themselves; keep them in step.

#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            prefix: "gw:".into(),
        }
    }
}

impl Keys {
    pub fn room_stream(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:s", self.prefix)
    }

    /// Presence: connection → `userId\nuser fragment`.
    pub fn room_conns(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:pc", self.prefix)
    }

    /// Presence: userId → number of its connections in the room. Its size is `num`.
    pub fn room_users(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:pu", self.prefix)
    }

    pub fn room_channel(&self, room: &str) -> String {
        format!("{}{{r:{room}}}:ch", self.prefix)
    }

    pub fn room_dedup(&self, room: &str, user: &str, client_msg_id: &str) -> String {
        format!(
            "{}{{r:{room}}}:d:{}:{user}:{client_msg_id}",
            self.prefix,
            user.len()
        )
    }

    pub fn inbox_stream(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:in", self.prefix)
    }

    pub fn inbox_dedup(&self, user: &str, from: &str, client_msg_id: &str) -> String {
        format!(
            "{}{{u:{user}}}:d:{}:{from}:{client_msg_id}",
            self.prefix,
            from.len()
        )
    }

    pub fn user_channel(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:ch", self.prefix)
    }

    /// Acknowledged positions of a user: field `r:<room>` or `dm` → id.
    pub fn acks(&self, user: &str) -> String {
        format!("{}{{u:{user}}}:acks", self.prefix)
    }

    /// Sorted set of every presence entry in the cluster (`room\nconn`) by expiry time.
    pub fn presence_expiry(&self) -> String {
        format!("{}presence:exp", self.prefix)
    }

    /// Hash of rooms with someone present: room key → room fragment.
    pub fn rooms(&self) -> String {
        format!("{}rooms", self.prefix)
    }
}

/// Field of `Keys::acks` for a room.
pub fn ack_field_room(room: &str) -> String {
    format!("r:{room}")
}

pub const ACK_FIELD_INBOX: &str = "dm";
