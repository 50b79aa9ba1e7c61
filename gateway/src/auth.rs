//! Authentication: verifying JWT logins (an HS256 secret and/or an RS256/ES256 public key),
//! the claims a proven connection carries (user, name, expiry, the rooms it may join), the
//! Origin check for browser upgrades, and minting tokens for demos and tests (`gateway token`).
//!
//! Refusals carry a reason *category* only (`AuthError::reason`), never which key, claim value
//! or signature detail failed: that is logged at debug level, not told to the client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::protocol::{check_name, GUEST_PREFIX};

/// Longest token accepted (a JWT with a few claims is well under 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token or a request was refused: the category told to the client and used as the
/// `reason` label of `gateway_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token is not signed by a trusted key")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's claims are not acceptable (sub, name, issuer, audience or not-before)")]
    Claims,
    #[error("the token is for another user than this connection or frame")]
    UserMismatch,
    #[error("the token does not allow this room")]
    Room,
    #[error("this needs a proven identity; the gateway runs without authentication")]
    Anonymous,
    #[error("the page's origin is not allowed to open a connection")]
    Origin,
}

impl AuthError {
    pub const ALL: [AuthError; 9] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Signature,
        AuthError::Expired,
        AuthError::Claims,
        AuthError::UserMismatch,
        AuthError::Room,
        AuthError::Anonymous,
        AuthError::Origin,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::Claims => "claims",
            AuthError::UserMismatch => "user_mismatch",
            AuthError::Room => "room",
            AuthError::Anonymous => "anonymous",
            AuthError::Origin => "origin",
        }
    }

    /// Refusals of who the client is (`unauthorized`) rather than of what it asked for
    /// (`forbidden`).
    pub fn is_unauthorized(self) -> bool {
        !matches!(
            self,
            AuthError::Room | AuthError::Anonymous | AuthError::Origin
        )
    }
}

/// The rooms a token allows: exact ids, prefixes written `prefix*`, or `*` for every room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRule {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl RoomRule {
    pub fn parse(patterns: &[String]) -> RoomRule {
        let mut rule = RoomRule {
            exact: Vec::new(),
            prefixes: Vec::new(),
        };
        for pattern in patterns {
            match pattern.strip_suffix('*') {
                Some(prefix) => rule.prefixes.push(prefix.to_string()),
                None => rule.exact.push(pattern.clone()),
            }
        }
        rule
    }

    /// `room_key` is the room's text identity (`1` and `"1"` are the same room).
    pub fn allows(&self, room_key: &str) -> bool {
        self.exact.iter().any(|r| r == room_key)
            || self.prefixes.iter().any(|p| room_key.starts_with(p))
    }
}

/// What a verified token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user_id: String,
    pub user_name: Option<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    /// `None`: every room.
    pub rooms: Option<RoomRule>,
}

impl Claims {
    pub fn allows_room(&self, room_key: &str) -> bool {
        self.rooms.as_ref().is_none_or(|rule| rule.allows(room_key))
    }

    /// Time left until the connection must be closed (expiry plus the configured leeway).
    pub fn time_left(&self, leeway_secs: u64) -> Duration {
        let deadline = Duration::from_secs(self.expires_at.saturating_add(leeway_secs));
        deadline.saturating_sub(since_epoch())
    }
}

/// The claims as they appear in the token.
#[derive(Debug, Serialize, Deserialize)]
struct RawClaims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rooms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies tokens with the configured keys.
pub struct Authenticator {
    /// One key per accepted algorithm.
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
    pub leeway_secs: u64,
}

impl Authenticator {
    /// `Ok(None)` when no key is configured (anonymous mode); `Err` explains a bad setting.
    pub fn from_config(config: &Config) -> Result<Option<Authenticator>, String> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            if secret.len() < 32 {
                return Err(
                    "GATEWAY_JWT_SECRET must be at least 32 bytes (HS256 keys shorter \
                            than the hash are guessable)"
                        .into(),
                );
            }
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("GATEWAY_JWT_PUBLIC_KEY_FILE {}: {e}", path.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                keys.push((Algorithm::RS256, key));
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                keys.push((Algorithm::ES256, key));
            } else {
                return Err(format!(
                    "GATEWAY_JWT_PUBLIC_KEY_FILE {} holds no RSA or EC (P-256) public key in PEM",
                    path.display()
                ));
            }
        }
        if keys.is_empty() {
            if config.jwt_issuer.is_some() || config.jwt_audience.is_some() {
                return Err(
                    "GATEWAY_JWT_ISSUER/GATEWAY_JWT_AUDIENCE need GATEWAY_JWT_SECRET or \
                            GATEWAY_JWT_PUBLIC_KEY_FILE"
                        .into(),
                );
            }
            return Ok(None);
        }
        Ok(Some(Authenticator {
            keys,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway_secs: config.jwt_leeway_secs,
        }))
    }

    /// Checks a token's signature, expiry and claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            tracing::debug!("token header refused: {e}");
            AuthError::Malformed
        })?;
        // Only the algorithm of a configured key is tried: a token cannot choose its own
        // verification (no `none`, no HS256 signed with a public key as the secret).
        let Some((alg, key)) = self.keys.iter().find(|(alg, _)| *alg == header.alg) else {
            tracing::debug!(alg = ?header.alg, "token algorithm has no configured key");
            return Err(AuthError::Signature);
        };
        let mut validation = Validation::new(*alg);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not merely checked when present.
        let mut required = vec!["exp", "sub"];
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        required.extend(self.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<RawClaims>(token, key, &validation).map_err(|e| {
            tracing::debug!("token refused: {e}");
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => AuthError::Signature,
                ErrorKind::InvalidIssuer
                | ErrorKind::InvalidAudience
                | ErrorKind::InvalidSubject
                | ErrorKind::ImmatureSignature
                | ErrorKind::MissingRequiredClaim(_)
                | ErrorKind::InvalidClaimFormat(_) => AuthError::Claims,
                _ => AuthError::Malformed,
            }
        })?;
        let raw = data.claims;
        if check_name(&raw.sub).is_err() || raw.sub.starts_with(GUEST_PREFIX) {
            return Err(AuthError::Claims);
        }
        if let Some(name) = &raw.name {
            check_name(name).map_err(|_| AuthError::Claims)?;
        }
        Ok(Claims {
            user_id: raw.sub,
            user_name: raw.name,
            expires_at: raw.exp,
            rooms: raw.rooms.as_deref().map(RoomRule::parse),
        })
    }
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The Origin policy for browser upgrades.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPolicy {
    /// Only the request's own host (the default).
    SameHost,
    /// Any origin (`*`).
    Any,
    /// These origins (`scheme://host[:port]`, lower case, default port left out).
    List(Vec<String>),
}

impl OriginPolicy {
    pub fn parse(setting: Option<&str>) -> Result<OriginPolicy, String> {
        let Some(setting) = setting.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(OriginPolicy::SameHost);
        };
        if setting == "*" {
            return Ok(OriginPolicy::Any);
        }
        let mut origins = Vec::new();
        for item in setting.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let origin = normalize_origin(item).ok_or_else(|| {
                format!(
                    "GATEWAY_ALLOWED_ORIGINS entry {item:?} is not an origin like https://chat.example.com"
                )
            })?;
            origins.push(origin);
        }
        Ok(OriginPolicy::List(origins))
    }

    /// Whether a request with this `Origin` (absent for non-browser clients) and `Host` may
    /// open a WebSocket.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true; // not a browser: Origin protects browsers' users, nobody else
        };
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => normalize_origin(origin).is_some_and(|o| list.contains(&o)),
            OriginPolicy::SameHost => {
                let (Some(origin), Some(host)) = (normalize_origin(origin), host) else {
                    return false;
                };
                let scheme_end = origin.find("://").map_or(0, |i| i + 3);
                let scheme = &origin[..scheme_end.saturating_sub(3)];
                origin[scheme_end..] == normalize_authority(scheme, host)
            }
        }
    }
}

/// `scheme://host[:port]` in lower case with the scheme's default port left out; `None` for
/// anything else (including the opaque origin `null`).
fn normalize_origin(origin: &str) -> Option<String> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "http" | "https") || rest.is_empty() {
        return None;
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@', ' ']) || authority.is_empty() {
        return None;
    }
    Some(format!(
        "{scheme}://{}",
        normalize_authority(&scheme, authority)
    ))
}

fn normalize_authority(scheme: &str, authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    match authority.strip_suffix(default_port) {
        Some(host) => host.to_string(),
        None => authority,
    }
}

/// Options of `gateway token`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "gateway token",
    about = "Mint a JWT for demos and tests: HS256 with GATEWAY_JWT_SECRET, or RS256/ES256 \
             with a PEM private key. Prints the token."
)]
pub struct TokenCommand {
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// The display name (`name`).
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime in seconds (`exp` = now + ttl; negative mints an expired token).
    #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
    pub ttl: i64,
    /// Rooms the token allows, comma-separated; `prefix*` matches a prefix. Default: every room.
    #[arg(long)]
    pub rooms: Option<String>,
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub issuer: Option<String>,
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub audience: Option<String>,
    /// HS256 secret.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// PEM private key (RSA → RS256, EC P-256 → ES256); takes precedence over the secret.
    #[arg(long)]
    pub private_key_file: Option<std::path::PathBuf>,
}

impl TokenCommand {
    pub fn mint(&self) -> Result<String, String> {
        let (alg, key) = match (&self.private_key_file, &self.secret) {
            (Some(path), _) => {
                let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
                    (Algorithm::RS256, key)
                } else if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
                    (Algorithm::ES256, key)
                } else {
                    return Err(format!(
                        "{} holds no RSA or EC private key in PEM",
                        path.display()
                    ));
                }
            }
            (None, Some(secret)) => (
                Algorithm::HS256,
                EncodingKey::from_secret(secret.as_bytes()),
            ),
            (None, None) => {
                return Err("set GATEWAY_JWT_SECRET (or --secret) or --private-key-file".into())
            }
        };
        let now = since_epoch().as_secs();
        let claims = RawClaims {
            sub: self.sub.clone(),
            name: self.name.clone(),
            exp: now.saturating_add_signed(self.ttl),
            rooms: self.rooms.as_ref().map(|r| {
                r.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(alg), &claims, &key).map_err(|e| e.to_string())
    }

    /// Runs `gateway token …` (arguments after the binary name); returns the exit code.
    pub fn run(args: impl IntoIterator<Item = String>) -> i32 {
        use clap::Parser;
        let command = match TokenCommand::try_parse_from(args) {
            Ok(command) => command,
            Err(err) => {
                let _ = err.print();
                return match err.kind() {
                    clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion => 0,
                    _ => crate::config::EXIT_CONFIG,
                };
            }
        };
        match command.mint() {
            Ok(token) => {
                println!("{token}");
                0
            }
            Err(message) => {
                eprintln!("error: {message}");
                crate::config::EXIT_CONFIG
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator() -> Authenticator {
        let config =
            Config::try_parse_from(["gateway", "--jwt-secret", SECRET, "--jwt-leeway-secs", "0"])
                .unwrap();
        Authenticator::from_config(&config).unwrap().unwrap()
    }

    fn mint(args: &[&str]) -> String {
        let mut argv = vec!["gateway token", "--secret", SECRET];
        argv.extend_from_slice(args);
        TokenCommand::try_parse_from(argv).unwrap().mint().unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let auth = authenticator();
        let token = mint(&[
            "--sub",
            "alice",
            "--name",
            "Alice",
            "--rooms",
            "lobby,team-*",
        ]);
        let claims = auth.verify(&token).unwrap();
        assert_eq!(claims.user_id, "alice");
        assert_eq!(claims.user_name.as_deref(), Some("Alice"));
        assert!(claims.allows_room("lobby"));
        assert!(claims.allows_room("team-7"));
        assert!(!claims.allows_room("lobby2"));
        assert!(!claims.allows_room("other"));
        let any = auth.verify(&mint(&["--sub", "bob"])).unwrap();
        assert!(any.allows_room("whatever"));
    }

    #[test]
    fn bad_tokens_get_their_reason() {
        let auth = authenticator();
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
        assert_eq!(auth.verify("not-a-jwt"), Err(AuthError::Malformed));
        assert_eq!(
            auth.verify(&mint(&["--sub", "a", "--ttl", "-10"])),
            Err(AuthError::Expired)
        );
        let other = TokenCommand::try_parse_from([
            "gateway token",
            "--secret",
            "another-secret-another-secret-xx",
            "--sub",
            "a",
        ])
        .unwrap()
        .mint()
        .unwrap();
        assert_eq!(auth.verify(&other), Err(AuthError::Signature));
        // alg "none": an unsigned token claiming any user.
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"admin","exp":99999999999}"#)
        );
        assert!(matches!(
            auth.verify(&none),
            Err(AuthError::Malformed | AuthError::Signature)
        ));
        assert_eq!(
            auth.verify(&mint(&["--sub", "guest-abc"])),
            Err(AuthError::Claims)
        );
        assert_eq!(
            auth.verify(&mint(&["--sub", "a\nb"])),
            Err(AuthError::Claims)
        );
    }

    fn b64(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let config = Config::try_parse_from([
            "gateway",
            "--jwt-secret",
            SECRET,
            "--jwt-issuer",
            "https://id.example",
            "--jwt-audience",
            "chat",
        ])
        .unwrap();
        let auth = Authenticator::from_config(&config).unwrap().unwrap();
        assert_eq!(auth.verify(&mint(&["--sub", "a"])), Err(AuthError::Claims));
        let good = mint(&[
            "--sub",
            "a",
            "--issuer",
            "https://id.example",
            "--audience",
            "chat",
        ]);
        assert!(auth.verify(&good).is_ok());
        let wrong_aud = mint(&[
            "--sub",
            "a",
            "--issuer",
            "https://id.example",
            "--audience",
            "other",
        ]);
        assert_eq!(auth.verify(&wrong_aud), Err(AuthError::Claims));
    }

    #[test]
    fn short_secrets_and_bad_key_files_are_configuration_errors() {
        let config = Config::try_parse_from(["gateway", "--jwt-secret", "short"]).unwrap();
        assert!(Authenticator::from_config(&config).is_err());
        let config =
            Config::try_parse_from(["gateway", "--jwt-public-key-file", "/nonexistent.pem"])
                .unwrap();
        assert!(Authenticator::from_config(&config).is_err());
        let config = Config::try_parse_from(["gateway"]).unwrap();
        assert!(Authenticator::from_config(&config).unwrap().is_none());
    }

    #[test]
    fn origins_same_host_by_default_or_listed() {
        let same = OriginPolicy::parse(None).unwrap();
        assert!(same.allows(None, Some("chat.example:8080")));
        assert!(same.allows(Some("http://chat.example:8080"), Some("chat.example:8080")));
        assert!(same.allows(Some("https://Chat.Example"), Some("chat.example:443")));
        assert!(same.allows(Some("http://chat.example"), Some("chat.example")));
        assert!(!same.allows(Some("http://evil.example"), Some("chat.example")));
        assert!(!same.allows(Some("null"), Some("chat.example")));
        assert!(!same.allows(Some("http://chat.example:8081"), Some("chat.example:8080")));
        assert!(!same.allows(Some("http://chat.example"), None));
        let list = OriginPolicy::parse(Some("https://a.example, http://b.example:8080")).unwrap();
        assert!(list.allows(Some("https://a.example:443"), Some("x")));
        assert!(list.allows(Some("http://b.example:8080"), Some("x")));
        assert!(!list.allows(Some("http://a.example"), Some("a.example")));
        assert!(OriginPolicy::parse(Some("*"))
            .unwrap()
            .allows(Some("null"), None));
        assert!(OriginPolicy::parse(Some("not an origin")).is_err());
    }
}
