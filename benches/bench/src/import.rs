//! Spreadsheet import end to end through the API, beside a bare `insert_many` of the same documents into the same
//! store in the same run.
//!
//! The sheet is generated first (not timed). The bare baseline inserts the documents the import would create, in
//! batches of the same size, into a fresh database on the same server with the same indexes (the shared ones and
//! the lease service's candidate index, which the running lease replica creates on the pool). The import is timed
//! from the start of the upload until `GET /api/imports/{id}` reports it finished, so it covers multipart upload,
//! the object store, the importer's read and validation, package resolution, the lookup of existing proxies, and the
//! inserts. A second import of the same file (every row already there) shows the re-import path.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use proxypool_contracts::Area;
use proxypool_store::model::{NewProxy, ProxyDoc};
use proxypool_store::{Store, StoreConfig};
use proxypool_system_tests::TestApp;
use proxypool_system_tests::API_KEY;
use serde_json::Value;

const BATCH: usize = 1_000;

fn host(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn sheet(n: usize) -> anyhow::Result<Vec<u8>> {
    let mut book = rust_xlsxwriter::Workbook::new();
    let s = book.add_worksheet();
    for (c, h) in ["host", "port", "area", "rotate_url", "provider", "package_code", "expired_at"].iter().enumerate() {
        s.write_string(0, u16::try_from(c)?, *h)?;
    }
    for i in 0..n {
        let r = u32::try_from(i + 1)?;
        s.write_string(r, 0, host(i))?;
        s.write_number(r, 1, 8000.0 + (i % 1000) as f64)?;
        s.write_string(r, 2, if i % 2 == 0 { "vn" } else { "global" })?;
        s.write_string(r, 3, format!("https://rotate.example/{i}"))?;
        s.write_string(r, 4, "TestProvider")?;
        s.write_string(r, 5, "TEST_PACK")?;
        s.write_string(r, 6, "2030-01-31")?;
    }
    Ok(book.save_to_buffer()?)
}

fn docs(n: usize, package: ObjectId) -> Vec<ProxyDoc> {
    (0..n)
        .map(|i| {
            ProxyDoc::new(NewProxy {
                ip: host(i),
                port: 8000 + u16::try_from(i % 1000).unwrap_or(0),
                username: String::new(),
                password: String::new(),
                area: if i % 2 == 0 { Area::Vn } else { Area::Global },
                rotate_url: format!("https://rotate.example/{i}"),
                rotate_time: 60,
                auth_token: None,
                is_active: true,
                disable_auto_rotate: false,
                expired_at: Some(bson::DateTime::from_millis(1_896_048_000_000)),
                proxy_package_id: package,
                package_name: "Test package".into(),
                created_by: None,
            })
        })
        .collect()
}

/// Uploads and waits for the job; returns (seconds, upload seconds, job).
async fn import(app: &TestApp, bytes: Vec<u8>) -> anyhow::Result<(f64, f64, Value)> {
    let t = Instant::now();
    let part = reqwest::multipart::Part::bytes(bytes).file_name("bench.xlsx");
    let res = app
        .http
        .post(app.url("/api/proxies/import?wait=false"))
        .header("Authorization", API_KEY)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await?;
    anyhow::ensure!(res.status().is_success(), "upload answered {}", res.status());
    let upload = t.elapsed().as_secs_f64();
    let mut job: Value = res.json().await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    while job["status"] != "succeeded" && job["status"] != "failed" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = app
            .http
            .get(app.url(&format!("/api/imports/{id}")))
            .header("Authorization", API_KEY)
            .send()
            .await?
            .json()
            .await?;
    }
    anyhow::ensure!(job["status"] == "succeeded", "import failed: {job}");
    Ok((t.elapsed().as_secs_f64(), upload, job))
}

/// Runs the suite for each size and renders the report.
pub async fn run(sizes: &[usize]) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "## Spreadsheet import (end to end through the API) vs bare `insert_many`\n")?;
    writeln!(
        out,
        "| rows | sheet | bare insert_many | import (upload → finished) | upload | read + validate | write | ratio | re-import (all skipped) |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for &n in sizes {
        eprintln!("--- {n} rows: generating the sheet");
        let bytes = sheet(n)?;
        let sheet_kib = bytes.len() / 1024;
        let app = TestApp::builder().spawn().await?;
        let _importer = app.start_importer(app.importer_config()).await?;

        eprintln!("--- {n} rows: bare insert_many");
        let bare_config =
            StoreConfig::local(app.mongo_server.uri(), format!("bench_bare_{}", ObjectId::new().to_hex()));
        let bare = Store::connect(&bare_config, "bench-bare").await?;
        // The same indexes as the pool's collection: the shared ones and the lease service's candidate index.
        bare.ensure_indexes().await?;
        bare.proxies().create_index(proxypool_lease::queries::lease_candidates_index()).await?;
        let documents = docs(n, app.package_id);
        let t = Instant::now();
        for chunk in documents.chunks(BATCH) {
            bare.proxies().insert_many(chunk).await?;
        }
        let bare_secs = t.elapsed().as_secs_f64();
        drop(documents);

        eprintln!("--- {n} rows: import");
        let (secs, upload, job) = import(&app, bytes.clone()).await?;
        anyhow::ensure!(job["counts"]["created"] == n, "created {} of {n}", job["counts"]["created"]);
        eprintln!("--- {n} rows: re-import");
        let (again, _, job2) = import(&app, bytes).await?;
        anyhow::ensure!(job2["counts"]["skipped"] == n, "re-import: {}", job2["counts"]);

        let rate = |s: f64| n as f64 / s;
        let at = |k: &str| {
            job[k].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp_millis())
        };
        let phase = |a: &str, b: &str| match (at(a), at(b)) {
            (Some(a), Some(b)) => format!("{:.2} s", (b - a) as f64 / 1000.0),
            _ => "-".to_owned(),
        };
        writeln!(
            out,
            "| {n} | {sheet_kib} KiB | {:.2} s ({:.0} rows/s) | {secs:.2} s ({:.0} rows/s) | {upload:.2} s | {} | {} | {:.2}× | {again:.2} s ({:.0} rows/s) |",
            bare_secs,
            rate(bare_secs),
            rate(secs),
            phase("created_at", "started_at"),
            phase("started_at", "finished_at"),
            bare_secs / secs,
            rate(again),
        )?;
        eprintln!("{out}");
        app.shutdown().await;
    }
    Ok(out)
}
