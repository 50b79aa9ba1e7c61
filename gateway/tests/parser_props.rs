//! Property tests of the client-frame parser (`gateway::protocol::parse_client_frame`), through
//! the public API only. The cargo-fuzz targets in `fuzz/` go further (docs/fuzzing.md); these run
//! with every `cargo test`.
//!
//! - Arbitrary text, and arbitrary JSON objects built from the frame field names with arbitrary
//!   values, never panic; every refusal encodes to a valid `error` frame with the same code and
//!   message, and every accepted frame keeps the parser's guarantees.
//! - A well-formed login, chat, ack or sync frame built from valid parts parses to exactly those
//!   parts.
//! - An id or name with a control character is always refused with `invalid_field`.

use gateway::protocol::{
    check_name, parse_client_frame, ClientFrame, ErrorCode, FrameError, Login, RoomId, StreamId,
    Target, GUEST_PREFIX, MAX_NAME_BYTES,
};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Checks

/// The codes parsing alone can give (the others need a connection's state).
const PARSE_CODES: [ErrorCode; 5] = [
    ErrorCode::BadJson,
    ErrorCode::NotObject,
    ErrorCode::UnknownEvent,
    ErrorCode::MissingField,
    ErrorCode::InvalidField,
];

fn check_error(err: &FrameError) -> Result<(), TestCaseError> {
    prop_assert!(PARSE_CODES.contains(&err.code), "code {:?}", err.code);
    let encoded = err.encode();
    let value: Value = serde_json::from_str(&encoded)
        .map_err(|e| TestCaseError::fail(format!("error frame {encoded:?} is not JSON: {e}")))?;
    prop_assert_eq!(&value["event"], "error");
    prop_assert_eq!(&value["code"], err.code.as_str());
    prop_assert_eq!(&value["message"], err.message.as_str());
    if let Some(room) = &err.room_json {
        let room: Value = serde_json::from_str(room)
            .map_err(|e| TestCaseError::fail(format!("room_json {room:?}: {e}")))?;
        prop_assert_eq!(&value["roomId"], &room);
    }
    if let Some(id) = &err.client_msg_id {
        prop_assert_eq!(&value["clientMsgId"], id.as_str());
    }
    Ok(())
}

fn check_name_ok(s: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !s.is_empty() && s.len() <= MAX_NAME_BYTES,
        "length of {:?}",
        s
    );
    prop_assert!(
        !s.chars().any(char::is_control),
        "control character in {:?}",
        s
    );
    Ok(())
}

fn check_opt_name(s: &Option<String>) -> Result<(), TestCaseError> {
    s.as_deref().map_or(Ok(()), check_name_ok)
}

/// `key` is the room's text form, `json` the JSON the client named it with.
fn check_room(room: &RoomId) -> Result<(), TestCaseError> {
    match serde_json::from_str::<Value>(&room.json) {
        Ok(Value::Number(n)) => {
            prop_assert!(n.is_i64() || n.is_u64(), "room {} is not an integer", n);
            prop_assert_eq!(&n.to_string(), &room.key);
        }
        Ok(Value::String(s)) => {
            prop_assert_eq!(&s, &room.key);
            check_name_ok(&s)?;
        }
        other => prop_assert!(false, "room json {:?} is {:?}", room.json, other),
    }
    Ok(())
}

fn check_target(target: &Target) -> Result<(), TestCaseError> {
    match target {
        Target::Room(room) => check_room(room),
        Target::Inbox => Ok(()),
    }
}

fn check_frame(frame: &ClientFrame) -> Result<(), TestCaseError> {
    match frame {
        ClientFrame::Login(login) => {
            check_room(&login.room)?;
            check_opt_name(&login.user_id)?;
            check_opt_name(&login.user_name)?;
            check_opt_name(&login.room_name)?;
            prop_assert!(!login
                .user_id
                .as_deref()
                .is_some_and(|u| u.starts_with(GUEST_PREFIX)));
            if let Some(token) = &login.token {
                prop_assert!(!token.is_empty() && token.len() <= 8192);
            }
        }
        ClientFrame::Logout { room } => check_room(room)?,
        ClientFrame::Ping => {}
        ClientFrame::Chat {
            room,
            content,
            client_msg_id,
            echo_user_id,
        } => {
            check_room(room)?;
            prop_assert!(!content.is_empty());
            check_opt_name(client_msg_id)?;
            if let Some(echo) = echo_user_id {
                prop_assert!(
                    serde_json::from_str::<Value>(echo).is_ok(),
                    "echo {:?}",
                    echo
                );
            }
        }
        ClientFrame::Refresh { token } => prop_assert!(!token.is_empty() && token.len() <= 8192),
        ClientFrame::Ack { target, .. } => check_target(target)?,
        ClientFrame::Sync { target, limit, .. } => {
            check_target(target)?;
            prop_assert!(limit.is_none_or(|l| l >= 1));
        }
        ClientFrame::Dm {
            to_user_id,
            content,
            client_msg_id,
        } => {
            check_name_ok(to_user_id)?;
            prop_assert!(!content.is_empty());
            check_opt_name(client_msg_id)?;
        }
    }
    Ok(())
}

/// Parses `text` (which must not panic) and checks whichever outcome.
fn check_text(text: &str) -> Result<(), TestCaseError> {
    match parse_client_frame(text) {
        Ok(frame) => check_frame(&frame),
        Err(err) => check_error(&err),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

const FIELDS: [&str; 16] = [
    "event",
    "userId",
    "userName",
    "roomId",
    "roomName",
    "content",
    "clientMsgId",
    "toUserId",
    "id",
    "since",
    "limit",
    "dm",
    "ack",
    "lastId",
    "token",
    "unknown",
];

const EVENTS: [&str; 9] = [
    "login",
    "logout",
    "heartBeat",
    "message",
    "ack",
    "sync",
    "refresh",
    "dm",
    "error",
];

/// An id or name the parser accepts: 1 to 128 bytes, no control characters.
fn valid_name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[^\\p{Cc}]{1,32}",
        1 => "[a-zA-Z0-9_.-]{1,8}",
        1 => "[a-z0-9]{120,128}",
        1 => "[房间名]{40,42}[ab]{0,2}",
    ]
    .prop_filter("1 to 128 bytes", |s| {
        !s.is_empty() && s.len() <= MAX_NAME_BYTES
    })
    .boxed()
}

/// A userId a client may claim.
fn valid_user_id() -> impl Strategy<Value = String> {
    valid_name().prop_filter("not a guest id", |s| !s.starts_with(GUEST_PREFIX))
}

/// A room as sent (`roomId`'s JSON) and the room it names.
fn valid_room() -> impl Strategy<Value = (Value, RoomId)> {
    let number = |text: String| RoomId {
        key: text.clone(),
        json: text,
    };
    prop_oneof![
        any::<i64>().prop_map(move |n| (json!(n), number(n.to_string()))),
        any::<u64>().prop_map(move |n| (json!(n), number(n.to_string()))),
        (0u64..1000).prop_map(move |n| (json!(n), number(n.to_string()))),
        valid_name().prop_map(|s| (
            json!(s),
            RoomId {
                key: s.clone(),
                json: serde_json::to_string(&s).unwrap(),
            }
        )),
    ]
}

fn stream_id() -> impl Strategy<Value = StreamId> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| StreamId { ms, seq }),
        (1_700_000_000_000u64..1_800_000_000_000, 0u64..10)
            .prop_map(|(ms, seq)| StreamId { ms, seq }),
    ]
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{1,40}",
        ".{1,20}"
    ]
}

fn content() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("non-empty", |s| !s.is_empty())
}

/// Any JSON value, biased towards what the fields hold.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (-3i64..3).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        valid_name().prop_map(Value::from),
        "[\\p{Cc}a-z]{0,4}".prop_map(Value::from),
        "[0-9]{1,21}(-[0-9]{1,21})?".prop_map(Value::from),
        prop::sample::select(EVENTS.to_vec()).prop_map(Value::from),
        Just(Value::from("ping")),
        Just(Value::from("guest-1")),
        "[a-z]{129,140}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{1,3}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON object from the frame field names (and one unknown) with arbitrary values.
fn frame_object() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(EVENTS.to_vec())),
        prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), any_value(), 0..8),
    )
        .prop_map(|(event, fields)| {
            let mut obj: Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            if let Some(event) = event {
                obj.insert("event".into(), json!(event));
            }
            Value::Object(obj)
        })
}

/// A valid name with one control character inserted somewhere.
fn name_with_control() -> impl Strategy<Value = String> {
    (valid_name(), "\\p{Cc}", any::<prop::sample::Index>()).prop_map(|(name, ctl, at)| {
        let boundaries: Vec<usize> = name
            .char_indices()
            .map(|(i, _)| i)
            .chain([name.len()])
            .collect();
        let at = boundaries[at.index(boundaries.len())];
        format!("{}{ctl}{}", &name[..at], &name[at..])
    })
}

fn insert_opt(obj: &mut Map<String, Value>, field: &str, value: &Option<String>) {
    if let Some(v) = value {
        obj.insert(field.into(), json!(v));
    }
}

fn text(obj: Map<String, Value>) -> String {
    Value::Object(obj).to_string()
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #[test]
    fn arbitrary_text_never_panics(s in any::<String>()) {
        check_text(&s)?;
    }

    #[test]
    fn json_like_text_never_panics(s in "[{}\\[\\]\":,.0-9a-zA-Z\\\\ -]{0,64}") {
        check_text(&s)?;
    }

    #[test]
    fn arbitrary_frame_objects_never_panic(obj in frame_object()) {
        check_text(&obj.to_string())?;
    }

    #[test]
    fn errors_encode_to_json_with_their_code(obj in frame_object(), tail in "[}\\]x]?") {
        // Also broken JSON: the object with a stray character after it.
        let text = format!("{obj}{tail}");
        if let Err(err) = parse_client_frame(&text) {
            check_error(&err)?;
            // With the room and clientMsgId echoed, whatever their content.
            let err = err.with_client_msg_id(Some("c\"\n\u{0}}"));
            check_error(&err)?;
        }
    }

    #[test]
    fn well_formed_login_parses_to_its_parts(
        (room_value, room) in valid_room(),
        user_id in prop::option::of(valid_user_id()),
        user_name in prop::option::of(valid_name()),
        room_name in prop::option::of(valid_name()),
        ack in prop::option::of(any::<bool>()),
        last_id in prop::option::of(stream_id()),
        token in prop::option::of(token()),
    ) {
        let mut obj = Map::new();
        obj.insert("event".into(), json!("login"));
        obj.insert("roomId".into(), room_value);
        insert_opt(&mut obj, "userId", &user_id);
        insert_opt(&mut obj, "userName", &user_name);
        insert_opt(&mut obj, "roomName", &room_name);
        if let Some(ack) = ack {
            obj.insert("ack".into(), json!(ack));
        }
        insert_opt(&mut obj, "lastId", &last_id.map(|id| id.to_string()));
        insert_opt(&mut obj, "token", &token);
        let expected = ClientFrame::Login(Login {
            user_id,
            user_name,
            room,
            room_name,
            ack: ack.unwrap_or(false),
            last_id,
            token,
        });
        prop_assert_eq!(parse_client_frame(&text(obj)).unwrap(), expected);
    }

    #[test]
    fn well_formed_chat_parses_to_its_parts(
        (room_value, room) in valid_room(),
        content in content(),
        client_msg_id in prop::option::of(valid_name()),
        user_id in prop::option::of(valid_name()),
        with_event in any::<bool>(),
    ) {
        let mut obj = Map::new();
        if with_event {
            obj.insert("event".into(), json!("message"));
        }
        obj.insert("roomId".into(), room_value);
        obj.insert("content".into(), json!(content));
        insert_opt(&mut obj, "clientMsgId", &client_msg_id);
        insert_opt(&mut obj, "userId", &user_id);
        let expected = ClientFrame::Chat {
            room,
            content,
            client_msg_id,
            echo_user_id: user_id.map(|u| serde_json::to_string(&u).unwrap()),
        };
        prop_assert_eq!(parse_client_frame(&text(obj)).unwrap(), expected);
    }

    #[test]
    fn well_formed_ack_parses_to_its_parts(
        room in prop::option::of(valid_room()),
        id in stream_id(),
    ) {
        let mut obj = Map::new();
        obj.insert("event".into(), json!("ack"));
        let target = match room {
            Some((value, room)) => {
                obj.insert("roomId".into(), value);
                Target::Room(room)
            }
            None => {
                obj.insert("dm".into(), json!(true));
                Target::Inbox
            }
        };
        obj.insert("id".into(), json!(id.to_string()));
        prop_assert_eq!(parse_client_frame(&text(obj)).unwrap(), ClientFrame::Ack { target, id });
    }

    #[test]
    fn well_formed_sync_parses_to_its_parts(
        room in prop::option::of(valid_room()),
        since in prop::option::of(stream_id()),
        limit in prop::option::of(prop_oneof![1u64..=2000, 1u64..=u64::MAX]),
    ) {
        let mut obj = Map::new();
        obj.insert("event".into(), json!("sync"));
        let target = match room {
            Some((value, room)) => {
                obj.insert("roomId".into(), value);
                Target::Room(room)
            }
            None => {
                obj.insert("dm".into(), json!(true));
                Target::Inbox
            }
        };
        insert_opt(&mut obj, "since", &since.map(|id| id.to_string()));
        if let Some(limit) = limit {
            obj.insert("limit".into(), json!(limit));
        }
        let expected = ClientFrame::Sync {
            target,
            since,
            // Larger limits are capped (the configured maximum caps them further).
            limit: limit.map(|l| l.min(u32::MAX as u64) as u32),
        };
        prop_assert_eq!(parse_client_frame(&text(obj)).unwrap(), expected);
    }

    #[test]
    fn ids_and_names_with_control_characters_are_refused(
        bad in name_with_control(),
        case in 0usize..12,
        (room_value, _) in valid_room(),
        good in valid_user_id(),
    ) {
        prop_assert!(check_name(&bad).is_err());
        let frame = match case {
            0 => json!({"event": "login", "roomId": room_value, "userId": bad}),
            1 => json!({"event": "login", "roomId": room_value, "userName": bad}),
            2 => json!({"event": "login", "roomId": room_value, "roomName": bad}),
            3 => json!({"event": "login", "roomId": bad, "userId": good}),
            4 => json!({"roomId": room_value, "content": "x", "clientMsgId": bad}),
            5 => json!({"roomId": bad, "content": "x"}),
            6 => json!({"event": "dm", "toUserId": bad, "content": "x"}),
            7 => json!({"event": "dm", "toUserId": good, "content": "x", "clientMsgId": bad}),
            8 => json!({"event": "logout", "roomId": bad}),
            9 => json!({"event": "ack", "roomId": bad, "id": "1-0"}),
            10 => json!({"event": "sync", "roomId": bad}),
            _ => json!({"event": "message", "roomId": room_value, "content": "x", "clientMsgId": bad}),
        };
        let text = frame.to_string();
        match parse_client_frame(&text) {
            Err(err) => {
                prop_assert_eq!(err.code, ErrorCode::InvalidField, "{}", text);
                check_error(&err)?;
            }
            Ok(frame) => prop_assert!(false, "{} accepted as {:?}", text, frame),
        }
    }

    #[test]
    fn a_chat_frames_user_id_with_control_characters_is_not_echoed(
        bad in name_with_control(),
        (room_value, _) in valid_room(),
    ) {
        let text = json!({"roomId": room_value, "content": "x", "userId": bad}).to_string();
        let frame = parse_client_frame(&text).unwrap();
        prop_assert!(
            matches!(frame, ClientFrame::Chat { echo_user_id: None, .. }),
            "{:?}",
            frame
        );
    }
}
