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

#[test]
fn manifests_are_complete_and_consistent() -> Result<()> {
    let all = resources()?;
    let help = gateway_help()?;
    let deployment = get(&all, "Deployment/chat-gateway")?;
    let spec = &deployment["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    let replicas = spec["replicas"].as_u64().unwrap_or(1);
    ensure!(replicas >= 3, "Deployment replicas {replicas}");
    let selects_pods = |selector: &Value| -> bool {
        selector
            .as_object()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &pod_labels[k] == v))
    };
    ensure!(selects_pods(&spec["selector"]["matchLabels"]));

    let gw = container(&all)?;
    let env = plain_env(gw);
    let secret = get(&all, "Secret/chat-gateway")?;
    let secret_keys: Vec<&String> = secret["stringData"]
        .as_object()
        .or_else(|| secret["data"].as_object())
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    // Every GATEWAY_* name in the Deployment is a gateway setting; secret references resolve.
    for item in gw["env"].as_array().into_iter().flatten() {
        let name = item["name"].as_str().unwrap_or_default();
        if name.starts_with("GATEWAY_") {
            ensure!(help.contains(name), "{name} is unknown to `gateway --help`");
        }
        if let Some(reference) = item["valueFrom"]["secretKeyRef"].as_object() {
            ensure!(reference["name"] == "chat-gateway", "{name}: other secret");
            let key = reference["key"].as_str().unwrap_or_default();
            ensure!(
                secret_keys.iter().any(|k| *k == key),
                "{name}: the Secret has no key {key}"
            );
        }
    }
    for key in &secret_keys {
        ensure!(
            help.contains(key.as_str()),
            "Secret key {key} is not a gateway setting"
        );
    }
    ensure!(secret_keys.iter().any(|k| *k == "GATEWAY_API_KEY"));
    ensure!(secret_keys.iter().any(|k| *k == "GATEWAY_JWT_SECRET"));
    ensure!(
        !env.contains_key("GATEWAY_NODE_ID"),
        "a fixed GATEWAY_NODE_ID would give every replica one node id"
    );
    ensure!(
        !env.contains_key("GATEWAY_API_KEY"),
        "the API key must come from the Secret"
    );

    // Listeners on the named ports; probes on the admin port.
    let http_port = container_port(gw, "http")?;
    let admin_port = container_port(gw, "admin")?;
    ensure!(port_of(&env["GATEWAY_LISTEN"])? == http_port);
    ensure!(port_of(&env["GATEWAY_ADMIN_LISTEN"])? == admin_port);
    ensure!(env["GATEWAY_LISTEN"].starts_with("0.0.0.0:"));
    ensure!(env["GATEWAY_ADMIN_LISTEN"].starts_with("0.0.0.0:"));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &gw[probe]["httpGet"];
        ensure!(get["path"] == path, "{probe} path {}", get["path"]);
        ensure!(
            get["port"] == "admin" || get["port"] == json!(admin_port),
            "{probe} is not on the admin port"
        );
    }

    // Termination: preStop sleep + the gateway's shutdown grace end before SIGKILL.
    let grace_s = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    let shutdown_ms: u64 = env
        .get("GATEWAY_SHUTDOWN_GRACE_MS")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(5_000);
    let pre_stop_s = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        grace_s * 1000 > pre_stop_s * 1000 + shutdown_ms,
        "terminationGracePeriodSeconds {grace_s} s does not cover preStop {pre_stop_s} s + \
         GATEWAY_SHUTDOWN_GRACE_MS {shutdown_ms} ms: clients would be SIGKILLed instead of \
         getting 1012"
    );

    // Services: the public one targets the http port, the admin one the admin port.
    let public = get(&all, "Service/chat-gateway")?;
    ensure!(selects_pods(&public["spec"]["selector"]));
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
    ensure!(selects_pods(&admin["spec"]["selector"]));
    ensure!(admin["spec"]["type"] == "ClusterIP" || admin["spec"]["type"].is_null());

    // Ingress: WebSocket timeouts above the heartbeat; only the public Service is routed.
    let ingress = get(&all, "Ingress/chat-gateway")?;
    let heartbeat_ms: u64 = env
        .get("GATEWAY_HEARTBEAT_TIMEOUT_MS")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(60_000);
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

    // Disruption budget and autoscaler.
    let pdb = get(&all, "PodDisruptionBudget/chat-gateway")?;
    ensure!(selects_pods(&pdb["spec"]["selector"]["matchLabels"]));
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
    let hpa = get(&all, "HorizontalPodAutoscaler/chat-gateway")?;
    ensure!(hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment");
    ensure!(hpa["spec"]["scaleTargetRef"]["name"] == "chat-gateway");
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
