//! Kubernetes manifests (deploy/k8s): validated against the Kubernetes schemas that
//! kubernetes-validate ships (strict: unknown fields fail; no network needed), the same
//! structural rules the compose file gets (every GATEWAY_* name is one `gateway --help` knows,
//! probes hit paths a live node serves on the admin port), and the rules that make a rollout
//! clean (termination grace longer than the gateway's shutdown grace, ingress timeouts longer
//! than the heartbeat, the admin port never routed by the Ingress).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, ensure, Context, Result};
use e2e::{gateway_bin, http_get, venv_bin, workspace_root, Gateway, GatewayOpts, RedisServer};
use serde_json::{json, Value};

fn k8s_dir() -> PathBuf {
    workspace_root().join("deploy/k8s")
}

fn manifest_files() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no manifests in deploy/k8s");
    Ok(files)
}

/// Every document of every manifest, by `Kind/name`.
fn resources() -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for file in manifest_files()? {
        let text = std::fs::read_to_string(&file)?;
        // Documents are separated by `---` lines (the only multi-document form used here).
        let mut docs = vec![String::new()];
        for line in text.lines() {
            if line.trim_end() == "---" {
                docs.push(String::new());
            } else {
                let doc = docs.last_mut().expect("one document at least");
                doc.push_str(line);
                doc.push('\n');
            }
        }
        for doc in docs {
            let value: Value = serde_yaml::from_str(&doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let key = format!(
                "{}/{}",
                value["kind"].as_str().unwrap_or("?"),
                value["metadata"]["name"].as_str().unwrap_or("?")
            );
            ensure!(
                out.insert(key.clone(), value).is_none(),
                "{key} defined twice"
            );
        }
    }
    Ok(out)
}

fn get<'a>(all: &'a BTreeMap<String, Value>, key: &str) -> Result<&'a Value> {
    all.get(key)
        .ok_or_else(|| anyhow!("deploy/k8s has no {key} (has {:?})", all.keys()))
}

fn gateway_help() -> Result<String> {
    let bin = gateway_bin();
    ensure!(
        bin.is_file(),
        "gateway binary {} not found: build it first (cargo build -p gateway)",
        bin.display()
    );
    let out = Command::new(&bin).arg("--help").env_clear().output()?;
    ensure!(out.status.success(), "gateway --help failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The gateway container of the Deployment.
fn container(all: &BTreeMap<String, Value>) -> Result<&Value> {
    get(all, "Deployment/chat-gateway")?["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "gateway"))
        .ok_or_else(|| anyhow!("the Deployment has no container named gateway"))
}

/// The container's plain `env` values (secret references left out).
fn plain_env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn port_of(addr: &str) -> Result<u64> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no port in {addr:?}"))
}

/// The containerPort named `name`.
fn container_port(container: &Value, name: &str) -> Result<u64> {
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .ok_or_else(|| anyhow!("no container port named {name}"))
}

fn kubernetes_validate(files: &[PathBuf]) -> Result<(bool, String)> {
    let out = Command::new(venv_bin("kubernetes-validate")?)
        .arg("--strict")
        .args(files)
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() -> Result<()> {
    let files = manifest_files()?;
    let (ok, text) = kubernetes_validate(&files)?;
    ensure!(ok, "kubernetes-validate failed:\n{text}");
    let passed = text.matches(" passed for resource ").count();
    ensure!(
        passed == resources()?.len(),
        "{passed} resources validated, expected {}:\n{text}",
        resources()?.len()
    );

    // The validator does catch mistakes: a misspelt field and a wrong type.
    let dir = tempfile::tempdir()?;
    let deployment = std::fs::read_to_string(k8s_dir().join("deployment.yaml"))?;
    for (what, bad) in [
        (
            "unknown field",
            deployment.replace("readinessProbe:", "readinesProbe:"),
        ),
        (
            "wrong type",
            deployment.replace("replicas: 3", "replicas: three"),
        ),
    ] {
        ensure!(bad != deployment, "{what}: the mutation changed nothing");
        let file = dir.path().join("deployment.yaml");
        std::fs::write(&file, bad)?;
        let (ok, text) = kubernetes_validate(&[file])?;
        ensure!(!ok, "a manifest with an {what} passed:\n{text}");
    }
    Ok(())
}

/// Whether `selector` (labels) is non-empty and matches the Deployment's pod labels.
fn selects_pods(all: &BTreeMap<String, Value>, selector: &Value) -> Result<bool> {
    let deployment = get(all, "Deployment/chat-gateway")?;
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    Ok(selector
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &pod_labels[k] == v)))
}

/// The Deployment's replicas.
fn replicas(all: &BTreeMap<String, Value>) -> Result<u64> {
    Ok(get(all, "Deployment/chat-gateway")?["spec"]["replicas"]
        .as_u64()
        .unwrap_or(1))
}

/// The keys of the gateway's Secret.
fn secret_keys(all: &BTreeMap<String, Value>) -> Result<Vec<String>> {
    let secret = get(all, "Secret/chat-gateway")?;
    Ok(secret["stringData"]
        .as_object()
        .or_else(|| secret["data"].as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}

/// A millisecond setting of the gateway container, or its default.
fn env_ms(env: &BTreeMap<String, String>, name: &str, default: u64) -> Result<u64> {
    let ms = env
        .get(name)
        .map(|v| v.parse())
        .transpose()
        .with_context(|| format!("{name} is not a number of milliseconds"))?;
    Ok(ms.unwrap_or(default))
}

#[test]
fn deployment_runs_three_replicas_of_the_pods_it_selects() -> Result<()> {
    let all = resources()?;
    let replicas = replicas(&all)?;
    ensure!(replicas >= 3, "Deployment replicas {replicas}");
    let spec = &get(&all, "Deployment/chat-gateway")?["spec"];
    ensure!(
        selects_pods(&all, &spec["selector"]["matchLabels"])?,
        "the Deployment's selector {} does not match its pod labels",
        spec["selector"]["matchLabels"]
    );
    Ok(())
}

#[test]
fn deployment_env_names_gateway_settings_and_resolvable_secret_keys() -> Result<()> {
    let all = resources()?;
    let help = gateway_help()?;
    let gw = container(&all)?;
    let secret_keys = secret_keys(&all)?;
    for item in gw["env"].as_array().into_iter().flatten() {
        let name = item["name"].as_str().unwrap_or_default();
        if name.starts_with("GATEWAY_") {
            ensure!(help.contains(name), "{name} is unknown to `gateway --help`");
        }
        if let Some(reference) = item["valueFrom"]["secretKeyRef"].as_object() {
            ensure!(reference["name"] == "chat-gateway", "{name}: other secret");
            let key = reference["key"].as_str().unwrap_or_default();
            ensure!(
                secret_keys.iter().any(|k| k == key),
                "{name}: the Secret has no key {key}"
            );
        }
    }
    Ok(())
}

#[test]
fn secret_holds_gateway_settings_with_the_api_key_and_jwt_secret() -> Result<()> {
    let all = resources()?;
    let help = gateway_help()?;
    let secret_keys = secret_keys(&all)?;
    for key in &secret_keys {
        ensure!(
            help.contains(key.as_str()),
            "Secret key {key} is not a gateway setting"
        );
    }
    for needed in ["GATEWAY_API_KEY", "GATEWAY_JWT_SECRET"] {
        ensure!(
            secret_keys.iter().any(|k| k == needed),
            "the Secret has no {needed} (keys: {secret_keys:?})"
        );
    }
    Ok(())
}

#[test]
fn deployment_fixes_no_node_id_and_takes_the_api_key_from_the_secret() -> Result<()> {
    let all = resources()?;
    let env = plain_env(container(&all)?);
    ensure!(
        !env.contains_key("GATEWAY_NODE_ID"),
        "a fixed GATEWAY_NODE_ID would give every replica one node id"
    );
    ensure!(
        !env.contains_key("GATEWAY_API_KEY"),
        "the API key must come from the Secret"
    );
    Ok(())
}

#[test]
fn listeners_are_on_the_named_ports_and_probes_on_the_admin_port() -> Result<()> {
    let all = resources()?;
    let gw = container(&all)?;
    let env = plain_env(gw);
    let http_port = container_port(gw, "http")?;
    let admin_port = container_port(gw, "admin")?;
    for (name, port) in [
        ("GATEWAY_LISTEN", http_port),
        ("GATEWAY_ADMIN_LISTEN", admin_port),
    ] {
        let listen = env
            .get(name)
            .ok_or_else(|| anyhow!("the container sets no {name}"))?;
        ensure!(
            port_of(listen)? == port,
            "{name} {listen} is not on the container port {port}"
        );
        ensure!(
            listen.starts_with("0.0.0.0:"),
            "{name} {listen} does not listen on every address"
        );
    }
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &gw[probe]["httpGet"];
        ensure!(get["path"] == path, "{probe} path {}", get["path"]);
        ensure!(
            get["port"] == "admin" || get["port"] == json!(admin_port),
            "{probe} is not on the admin port"
        );
    }
    Ok(())
}

#[test]
fn termination_grace_covers_pre_stop_and_the_shutdown_grace() -> Result<()> {
    let all = resources()?;
    let gw = container(&all)?;
    let env = plain_env(gw);
    let spec = &get(&all, "Deployment/chat-gateway")?["spec"];
    let grace_s = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    let shutdown_ms = env_ms(&env, "GATEWAY_SHUTDOWN_GRACE_MS", 5_000)?;
    let pre_stop_s = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        grace_s * 1000 > pre_stop_s * 1000 + shutdown_ms,
        "terminationGracePeriodSeconds {grace_s} s does not cover preStop {pre_stop_s} s + \
         GATEWAY_SHUTDOWN_GRACE_MS {shutdown_ms} ms: clients would be SIGKILLed instead of \
         getting 1012"
    );
    Ok(())
}

#[test]
fn services_target_the_http_port_publicly_and_the_admin_port_inside() -> Result<()> {
    let all = resources()?;
    let http_port = container_port(container(&all)?, "http")?;
    let public = get(&all, "Service/chat-gateway")?;
    ensure!(
        selects_pods(&all, &public["spec"]["selector"])?,
        "the public Service does not select the Deployment's pods"
    );
    let targets: Vec<&Value> = public["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| &p["targetPort"])
        .collect();
    ensure!(
        targets
            .iter()
            .all(|t| **t == "http" || **t == json!(http_port)),
        "the public Service exposes {targets:?}"
    );
    let admin = get(&all, "Service/chat-gateway-admin")?;
    ensure!(
        selects_pods(&all, &admin["spec"]["selector"])?,
        "the admin Service does not select the Deployment's pods"
    );
    ensure!(
        admin["spec"]["type"] == "ClusterIP" || admin["spec"]["type"].is_null(),
        "the admin Service is of type {}, not ClusterIP",
        admin["spec"]["type"]
    );
    Ok(())
}

#[test]
fn ingress_outlasts_the_heartbeat_and_routes_only_the_public_service() -> Result<()> {
    let all = resources()?;
    let env = plain_env(container(&all)?);
    let ingress = get(&all, "Ingress/chat-gateway")?;
    let heartbeat_ms = env_ms(&env, "GATEWAY_HEARTBEAT_TIMEOUT_MS", 60_000)?;
    for annotation in ["proxy-read-timeout", "proxy-send-timeout"] {
        let key = format!("nginx.ingress.kubernetes.io/{annotation}");
        let seconds: u64 = ingress["metadata"]["annotations"][&key]
            .as_str()
            .ok_or_else(|| anyhow!("Ingress has no {key}"))?
            .parse()?;
        ensure!(
            seconds * 1000 > heartbeat_ms,
            "{key} {seconds} s would cut quiet WebSockets before the heartbeat"
        );
    }
    let rules = ingress["spec"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(!rules.is_empty(), "Ingress has no rules");
    for rule in &rules {
        for path in rule["http"]["paths"].as_array().into_iter().flatten() {
            let service = &path["backend"]["service"];
            ensure!(
                service["name"] == "chat-gateway",
                "Ingress routes to {}",
                service["name"]
            );
            ensure!(
                service["port"]["name"] == "http" || service["port"]["number"] == json!(80),
                "Ingress routes to port {}",
                service["port"]
            );
        }
    }
    Ok(())
}

#[test]
fn disruption_budget_allows_one_eviction_and_keeps_the_rest() -> Result<()> {
    let all = resources()?;
    let replicas = replicas(&all)?;
    let pdb = get(&all, "PodDisruptionBudget/chat-gateway")?;
    ensure!(
        selects_pods(&all, &pdb["spec"]["selector"]["matchLabels"])?,
        "the PodDisruptionBudget does not select the Deployment's pods"
    );
    let allows_eviction = match (
        pdb["spec"]["maxUnavailable"].as_u64(),
        pdb["spec"]["minAvailable"].as_u64(),
    ) {
        (Some(max), None) => max >= 1 && max < replicas,
        (None, Some(min)) => min < replicas,
        _ => false,
    };
    ensure!(
        allows_eviction,
        "the PodDisruptionBudget must allow one eviction and keep the rest"
    );
    Ok(())
}

#[test]
fn autoscaler_scales_the_deployment_from_three_replicas() -> Result<()> {
    let all = resources()?;
    let hpa = get(&all, "HorizontalPodAutoscaler/chat-gateway")?;
    let target = &hpa["spec"]["scaleTargetRef"];
    ensure!(
        target["kind"] == "Deployment" && target["name"] == "chat-gateway",
        "the HPA scales {}/{}, not Deployment/chat-gateway",
        target["kind"],
        target["name"]
    );
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
    let max = hpa["spec"]["maxReplicas"].as_u64().unwrap_or(0);
    ensure!(min >= 3 && max > min, "HPA {min}..{max}");
    Ok(())
}

#[tokio::test]
async fn probes_and_scrape_path_hit_what_a_live_node_serves() -> Result<()> {
    let all = resources()?;
    let gw = container(&all)?;
    let annotations =
        &get(&all, "Deployment/chat-gateway")?["spec"]["template"]["metadata"]["annotations"];
    // The node runs with the Deployment's own settings (listen addresses aside).
    let redis = RedisServer::start().await?;
    let mut opts =
        GatewayOpts::redis(&redis.url()).env("GATEWAY_API_KEY", "k8s-test-key-0123456789");
    for (name, value) in plain_env(gw) {
        if ![
            "GATEWAY_LISTEN",
            "GATEWAY_ADMIN_LISTEN",
            "GATEWAY_REDIS_URL",
        ]
        .contains(&name.as_str())
        {
            opts = opts.env(&name, value);
        }
    }
    let node = Gateway::start(opts).await?;
    node.wait_ready(200).await?;
    let mut paths = vec![];
    for probe in ["readinessProbe", "livenessProbe"] {
        paths.push(
            gw[probe]["httpGet"]["path"]
                .as_str()
                .ok_or_else(|| anyhow!("{probe} has no path"))?
                .to_string(),
        );
    }
    paths.push(
        annotations["prometheus.io/path"]
            .as_str()
            .ok_or_else(|| anyhow!("no prometheus.io/path annotation"))?
            .to_string(),
    );
    ensure!(
        annotations["prometheus.io/port"] == json!(container_port(gw, "admin")?.to_string()),
        "Prometheus would scrape another port than the admin port"
    );
    for path in &paths {
        let (status, _) = http_get(&node.admin_addr(), path).await?;
        ensure!(status == 200, "admin {path} answered {status}");
        // Not on the public port: a probe pointed there by mistake would fail.
        let (status, _) = http_get(&node.addr(), path).await?;
        ensure!(status == 404, "public {path} answered {status}");
    }
    Ok(())
}
