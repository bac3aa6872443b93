//! Open-loop load generator for `scripts/bench-broker`: sends requests at a fixed rate, each
//! at its scheduled time whatever the earlier ones are doing, and measures latency from that
//! scheduled time (so a slow server cannot hide its queueing, unlike a closed loop such as
//! Debian's wrk). Prints one JSON line.
//!
//!   broker_load URL[,URL...] --rate 200 --count 1000 [--method POST] [--tokens FILE] [--logoff]
//!
//! With several URLs (brokers on one catalog), request i goes to URL i mod n. With
//! `--tokens`, request i carries the bearer token on line i mod n. With `--logoff`, every
//! session a request opened is logged off afterwards, through the broker that opened it (not
//! measured).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let urls: Vec<String> = args
        .get(1)
        .expect("usage: broker_load URL[,URL...] --rate R --count N [--method M] [--tokens F] [--logoff]")
        .split(',')
        .map(str::to_string)
        .collect();
    let base = |url: &str| url.split("/api/").next().unwrap_or(url).to_string();
    let rate: f64 = arg(&args, "--rate").map_or(200.0, |r| r.parse().expect("--rate"));
    let count: usize = arg(&args, "--count").map_or(1000, |c| c.parse().expect("--count"));
    let method: reqwest::Method = arg(&args, "--method").unwrap_or_else(|| "GET".into()).parse().expect("--method");
    let tokens: Vec<String> = arg(&args, "--tokens")
        .map(|f| std::fs::read_to_string(f).expect("--tokens").lines().map(str::to_string).collect())
        .unwrap_or_default();
    let logoff = args.iter().any(|a| a == "--logoff");
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("client");

    // Warm the connection pool so the first requests do not pay for TCP setup.
    for url in &urls {
        for _ in 0..4 {
            let _ = client.get(format!("{}/healthz", base(url))).send().await;
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (client, url, method) = (client.clone(), urls[i % urls.len()].clone(), method.clone());
            let token = (!tokens.is_empty()).then(|| tokens[i % tokens.len()].clone());
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let mut req = client.request(method, &url);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let (status, body) = match req.send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        (s, r.text().await.unwrap_or_default())
                    }
                    Err(_) => (0, String::new()),
                };
                (status, at.elapsed().as_secs_f64() * 1e3, token, body, url)
            })
        })
        .collect();
    let mut results = Vec::with_capacity(count);
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut lat: Vec<f64> = results.iter().map(|r| r.1).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    for r in &results {
        *statuses.entry(r.0).or_default() += 1;
    }
    if logoff {
        for (status, _, token, body, url) in &results {
            let id =
                serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["id"].as_str().map(String::from));
            if let (201, Some(t), Some(id)) = (status, token, id) {
                let _ = client.delete(format!("{}/api/v1/sessions/{id}", base(url))).bearer_auth(t).send().await;
            }
        }
    }
    let out = serde_json::json!({
        "count": count,
        "brokers": urls.len(),
        "rate": rate,
        "achieved_rps": count as f64 / elapsed,
        "statuses": statuses,
        "p50_ms": percentile(&lat, 50.0),
        "p90_ms": percentile(&lat, 90.0),
        "p99_ms": percentile(&lat, 99.0),
        "max_ms": lat.last().copied().unwrap_or(f64::NAN),
    });
    println!("{out}");
}
