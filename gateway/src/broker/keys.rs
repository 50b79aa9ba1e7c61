//! Names of every broker key and channel, and the encoding that keeps client strings inside
//! them. Keys of one room (or one user) share a hash tag (`{r:…}` / `{u:…}`) so they stay on
//! one Redis Cluster slot.
//!
//! Every client string (room id, user id, clientMsgId) is percent-encoded before it becomes
//! part of a name: only `[A-Za-z0-9_.-]` pass unchanged, so an encoded part never contains
//! `{`, `}`, `:` or `%` followed by anything but its own escape. Hash tags therefore stay
//! intact, and two distinct (room, user, clientMsgId) never share a key.
//!
//! No key is shared by every room or user: the presence expiry index is spread over
//! `PRESENCE_PARTITIONS` hash slots and time buckets, so nothing here needs a script or a
//! pipeline that crosses slots.

use std::borrow::Cow;

use super::{PresenceEntry, Topic};

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

/// Percent-encodes every byte outside `[A-Za-z0-9_.-]`; injective, and the result never
/// contains `{`, `}`, `:` or a newline.
pub fn encode_part(s: &str) -> Cow<'_, str> {
    let plain = is_plain;
    if s.bytes().all(plain) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

/// Reverses `encode_part`; `None` for text it cannot have produced (so `encode_part` of the
/// result gives the same text back).
pub fn decode_part(s: &str) -> Option<String> {
    let upper_hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let high = upper_hex(*bytes.get(i + 1)?)?;
                let low = upper_hex(*bytes.get(i + 2)?)?;
                let byte = high << 4 | low;
                if is_plain(byte) {
                    return None; // encode_part never escapes a plain byte
                }
                out.push(byte);
                i += 3;
            }
            b if is_plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Bytes `encode_part` leaves as they are.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

impl Keys {
    fn room(&self, room: &str, suffix: &str) -> String {
        format!("{}{{r:{}}}:{suffix}", self.prefix, encode_part(room))
    }

    fn user(&self, user: &str, suffix: &str) -> String {
        format!("{}{{u:{}}}:{suffix}", self.prefix, encode_part(user))
    }

    pub fn room_stream(&self, room: &str) -> String {
        self.room(room, "s")
    }

    /// Presence: connection → length-prefixed record `<len(userId)>:<userId><user fragment>`.
    pub fn room_conns(&self, room: &str) -> String {
        self.room(room, "pc")
    }

    /// Presence: userId → number of its connections in the room. Its size is `num`.
    pub fn room_users(&self, room: &str) -> String {
        self.room(room, "pu")
    }

    /// Login/logout announcements made in the room this second (expires after one).
    pub fn room_announces(&self, room: &str) -> String {
        self.room(room, "an")
    }

    pub fn room_channel(&self, room: &str) -> String {
        self.room(room, "ch")
    }

    pub fn room_dedup(&self, room: &str, user: &str, client_msg_id: &str) -> String {
        self.room(
            room,
            &format!("d:{}:{}", encode_part(user), encode_part(client_msg_id)),
        )
    }

    pub fn inbox_stream(&self, user: &str) -> String {
        self.user(user, "in")
    }

    pub fn inbox_dedup(&self, user: &str, from: &str, client_msg_id: &str) -> String {
        self.user(
            user,
            &format!("d:{}:{}", encode_part(from), encode_part(client_msg_id)),
        )
    }

    /// Exists while the user logged in (with proof) within the history TTL: DMs are accepted
    /// only for such users.
    pub fn user_seen(&self, user: &str) -> String {
        self.user(user, "seen")
    }

    pub fn user_channel(&self, user: &str) -> String {
        self.user(user, "ch")
    }

    /// Acknowledged positions of a user: field `r:<room>` or `dm` → id.
    pub fn acks(&self, user: &str) -> String {
        self.user(user, "acks")
    }

    /// Presence: connection → when its entry expires (ms), for pruning.
    pub fn room_expiry(&self, room: &str) -> String {
        self.room(room, "px")
    }

    /// The room's record while anyone is in it: `<roomId JSON>\n<roomName JSON>` of its first
    /// joiner.
    pub fn room_record(&self, room: &str) -> String {
        self.room(room, "i")
    }

    /// The four presence keys of a room plus its announcement counter, in the order the
    /// presence scripts take them.
    pub fn room_presence(&self, room: &str) -> [String; 5] {
        [
            self.room_conns(room),
            self.room_users(room),
            self.room_expiry(room),
            self.room_record(room),
            self.room_announces(room),
        ]
    }

    /// The set of rooms (encoded keys) of `partition` with a presence entry expiring in time
    /// bucket `bucket` (see `presence_partition`).
    pub fn presence_index(&self, partition: u32, bucket: u64) -> String {
        format!("{}{{px:{partition}}}:{bucket}", self.prefix)
    }
}

/// Slots the presence expiry index is spread over.
pub const PRESENCE_PARTITIONS: u32 = 16;

/// The index partition of a room: FNV-1a of its key, the same on every node.
pub fn presence_partition(room: &str) -> u32 {
    let hash = room.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % u64::from(PRESENCE_PARTITIONS)) as u32
}

impl Keys {
    /// The stream a topic's messages are kept in.
    pub fn stream(&self, topic: &Topic) -> String {
        match topic {
            Topic::Room(room) => self.room_stream(room),
            Topic::User(user) => self.inbox_stream(user),
        }
    }

    /// The pub/sub channel a topic's messages are published on.
    pub fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Room(room) => self.room_channel(room),
            Topic::User(user) => self.user_channel(user),
        }
    }

    /// The key remembering `sender`'s dedup id `id` under a topic.
    pub fn dedup(&self, topic: &Topic, sender: &str, id: &str) -> String {
        match topic {
            Topic::Room(room) => self.room_dedup(room, sender, id),
            Topic::User(user) => self.inbox_dedup(user, sender, id),
        }
    }

    /// The topic whose channel is `channel` (`None` for a name `channel` never made).
    pub fn topic_of_channel(&self, channel: &str) -> Option<Topic> {
        let rest = channel.strip_prefix(self.prefix.as_str())?;
        let rest = rest.strip_prefix('{')?.strip_suffix("}:ch")?;
        if let Some(room) = rest.strip_prefix("r:") {
            return Some(Topic::Room(decode_part(room)?));
        }
        Some(Topic::User(decode_part(rest.strip_prefix("u:")?)?))
    }
}

/// The field of a user's positions hash (`Keys::acks`) for a topic.
pub fn position_field(topic: &Topic) -> String {
    match topic {
        Topic::Room(room) => ack_field_room(room),
        Topic::User(_) => ACK_FIELD_INBOX.to_string(),
    }
}

/// The rooms-hash record of an entry's room: `<roomId JSON>\n<roomName JSON>` (JSON text never
/// holds a raw newline, so the first one separates the two).
pub fn room_record_of(entry: &PresenceEntry) -> String {
    format!(
        "{}\n{}",
        entry.room_json,
        crate::protocol::json_string(&entry.room_name)
    )
}

/// Splits a rooms-hash record into the room fragment `"roomId":…,"roomName":…`.
pub fn room_record_fragment(record: &str) -> Option<String> {
    let (room_json, name_json) = record.split_once('\n')?;
    Some(format!(r#""roomId":{room_json},"roomName":{name_json}"#))
}

/// Field of `Keys::acks` for a room (a hash field holds any bytes: no encoding needed, and the
/// `r:` prefix keeps rooms apart from `dm`).
fn ack_field_room(room: &str) -> String {
    format!("r:{room}")
}

const ACK_FIELD_INBOX: &str = "dm";

/// The presence record of a connection: `<len(userId)>:<userId><user fragment>`. The length
/// prefix means no byte of the user id can be mistaken for the separator.
pub fn presence_record(user_id: &str, user_fragment: &str) -> String {
    format!("{}:{user_id}{user_fragment}", user_id.len())
}

/// Splits a presence record into `(userId, user fragment)`.
pub fn parse_presence_record(record: &str) -> Option<(&str, &str)> {
    let (len, rest) = record.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if rest.len() < len || !rest.is_char_boundary(len) {
        return None;
    }
    Some(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn encoding_is_reversible_and_keeps_hash_tags_whole() {
        for s in [
            "1", "lobby", "a}:s", "x{y}", "大厅", "a%41", "%", "a\nb", "u:1", "",
        ] {
            let encoded = encode_part(s);
            assert!(
                !encoded.contains(['{', '}', ':', '\n']),
                "{s:?} → {encoded}"
            );
            assert_eq!(decode_part(&encoded).as_deref(), Some(s));
        }
        assert_eq!(encode_part("lobby-1_a.b"), "lobby-1_a.b");
        // Only what encode_part writes decodes.
        for foreign in ["%7d", "%+1", "a}b", "%41", "%4", "%"] {
            assert_eq!(decode_part(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn distinct_rooms_users_and_message_ids_never_share_a_key() {
        let keys = Keys::default();
        // Strings chosen to collide under the old `{r:<room>}:d:<len>:<user>:<id>` scheme.
        let rooms = ["x", "x}:d:1:u:c", "x}", "x}:s", "a:b", "a", "%78"];
        let users = ["u", "u:c", "1:u", "u}"];
        let ids = ["c", "c}:s", ":s", "c:u"];
        let mut seen = HashSet::new();
        let mut total = 0;
        for room in rooms {
            for name in [
                keys.room_stream(room),
                keys.room_conns(room),
                keys.room_users(room),
                keys.room_channel(room),
            ] {
                total += 1;
                seen.insert(name);
            }
            for user in users {
                for id in ids {
                    total += 1;
                    seen.insert(keys.room_dedup(room, user, id));
                }
            }
        }
        for user in users.iter().chain(rooms.iter()) {
            for name in [
                keys.inbox_stream(user),
                keys.user_channel(user),
                keys.acks(user),
            ] {
                total += 1;
                seen.insert(name);
            }
        }
        assert_eq!(seen.len(), total, "two inputs produced one key");
        for name in &seen {
            let tag = &name[name.find('{').unwrap()..=name.find('}').unwrap()];
            assert!(name.starts_with(&format!("gw:{tag}:")), "{name}");
        }
    }

    #[test]
    fn a_channel_names_its_topic() {
        let keys = Keys::default();
        for topic in [
            Topic::Room("a}:ch".into()),
            Topic::Room("大厅".into()),
            Topic::User("u{1}".into()),
            Topic::User(String::new()),
        ] {
            assert_eq!(keys.topic_of_channel(&keys.channel(&topic)), Some(topic));
        }
        for foreign in ["gw:{r:a}:s", "x:{r:a}:ch", "gw:{x:a}:ch", "gw:{r:%4}:ch"] {
            assert_eq!(keys.topic_of_channel(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn presence_records_split_at_the_length_not_at_a_character() {
        let record = presence_record("a\n:b", r#""userId":"a\n:b""#);
        assert_eq!(
            parse_presence_record(&record),
            Some(("a\n:b", r#""userId":"a\n:b""#))
        );
        assert_eq!(parse_presence_record("x"), None);
        assert_eq!(parse_presence_record("9:ab"), None);
    }
}
