//! The pool learns which proxies work for which site: a consumer returns a lease with an `outcome` and a `domain`;
//! `blocked` or `captcha` bans the proxy's exit IP for that site, and acquires for that site pass over every proxy
//! exiting on a banned IP. Black box: HTTP and NATS consumers against the real lease service (child processes, so a
//! leader can be SIGKILLed), NATS and the store.

use std::time::Duration;

use bson::{doc, oid::ObjectId, DateTime};
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseRelease};
use proxypool_contracts::lease::{AcquireRequest, LeaseGrant, ReleaseRequest};
use proxypool_contracts::{Area, ErrorCode};
use proxypool_system_tests::app::{LeaseProcess, API_KEY};
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use serde_json::Value;

type R<T = ()> = anyhow::Result<T>;

/// A system with two proxies (exit IPs 198.51.100.1 and .2) and one lease process with `BAN_BASE` = `ban_base`.
async fn two_proxies(ban_base: &str) -> R<(TestApp, LeaseProcess, ObjectId, ObjectId)> {
    let app = TestApp::builder().lease_instances(0).proxy_use_max(10).spawn().await?;
    let mut ids = Vec::new();
    for n in 1..=2 {
        let mut d = app.new_proxy(Area::Vn, n);
        d.ip_public = Some(format!("198.51.100.{n}"));
        app.store.proxies().insert_one(&d).await?;
        ids.push(d.id);
    }
    let lease = app.spawn_lease_process("health", &[("BAN_BASE", ban_base.to_owned())], &[]).await?;
    lease.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    Ok((app, lease, ids[0], ids[1]))
}

/// `GET /api/get-proxy?area=vn&domain=`.
async fn get_for(app: &TestApp, domain: &str) -> R<reqwest::Response> {
    Ok(app
        .http
        .get(app.url("/api/get-proxy"))
        .query(&[("area", "vn"), ("domain", domain)])
        .header("Authorization", API_KEY)
        .send()
        .await?)
}

/// Leases for `domain` over HTTP: the proxy id and key.
async fn lease_for(app: &TestApp, domain: &str) -> R<(String, String)> {
    let res = get_for(app, domain).await?;
    anyhow::ensure!(res.status() == StatusCode::OK, "get-proxy for {domain}: {}", res.text().await?);
    let g: Value = res.json().await?;
    Ok((g["id"].as_str().unwrap_or_default().to_owned(), g["key"].as_str().unwrap_or_default().to_owned()))
}

/// `POST /webhook/return-proxy/{id}?key=&<query>`.
async fn give_back(app: &TestApp, id: &str, key: &str, query: &[(&str, &str)]) -> R<reqwest::Response> {
    let mut q = vec![("key", key)];
    q.extend_from_slice(query);
    Ok(app
        .http
        .post(app.url(&format!("/webhook/return-proxy/{id}")))
        .query(&q)
        .header("Authorization", API_KEY)
        .send()
        .await?)
}

/// Leases for `domain` and returns at once, `n` times: the proxies handed out.
async fn proxies_for(app: &TestApp, domain: &str, n: usize) -> R<Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (id, key) = lease_for(app, domain).await?;
        let res = give_back(app, &id, &key, &[("outcome", "ok"), ("domain", domain)]).await?;
        anyhow::ensure!(res.status() == StatusCode::OK, "return: {}", res.text().await?);
        seen.push(id);
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_bans_the_exit_ip_for_that_site_only_and_says_so_when_nothing_else_is_left() -> R {
    let (app, mut lease, a, b) = two_proxies("600").await?;
    // The first lease for the site: whichever proxy ranks first; its holder is blocked there.
    let (banned, key) = lease_for(&app, "shop.example").await?;
    let (other_id, banned_ip) = if banned == a.to_hex() { (b, "198.51.100.1") } else { (a, "198.51.100.2") };
    let other = other_id.to_hex();
    let res = give_back(&app, &banned, &key, &[("outcome", "blocked"), ("domain", "Shop.Example:443")]).await?;
    assert_eq!(res.status(), StatusCode::OK, "{}", res.text().await?);
    // The site is leased the other proxy only, although the banned one ranks first for the second lease (used as
    // often, and longer ago).
    assert_eq!(proxies_for(&app, "shop.example", 2).await?, vec![other.clone(), other.clone()]);
    // Another site is not affected.
    assert_eq!(proxies_for(&app, "news.example", 1).await?, vec![banned.clone()]);
    // With the other proxy out of service, nothing can serve the site, and the answer says that bans are why.
    app.update_proxy(other_id, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    let refused = get_for(&app, "shop.example").await?;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = refused.json().await?;
    assert_eq!(body["error"]["code"], "no_proxy_available", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("banned") && message.contains("shop.example"), "{message}");
    assert_eq!(proxies_for(&app, "news.example", 1).await?, vec![banned.clone()], "other sites still lease it");
    // The ban is projected with the proxy it was reported through.
    let d = wait_for_ban(&app, &banned).await?;
    let ban = &d.health.bans[0];
    assert_eq!(
        (ban.ip.as_str(), ban.domain.as_str(), ban.count, ban.reason.as_str()),
        (banned_ip, "shop.example", 1, "blocked")
    );
    lease.kill().await;
    Ok(())
}

/// Waits until MongoDB shows a ban on `id`.
async fn wait_for_ban(app: &TestApp, id: &str) -> R<proxypool_store::model::ProxyDoc> {
    wait_for_ban_count(app, id, 1).await
}

/// Waits until MongoDB shows a ban of at least `count` in a row on `id`.
async fn wait_for_ban_count(app: &TestApp, id: &str, count: i64) -> R<proxypool_store::model::ProxyDoc> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = app.proxy(id).await?;
        if d.health.bans.iter().any(|b| b.count >= count) {
            return Ok(d);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no ban projected on {id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether an acquire for `domain` is refused because of bans.
async fn refused_for_bans(app: &TestApp, domain: &str) -> R<bool> {
    let res = get_for(app, domain).await?;
    if res.status() != StatusCode::SERVICE_UNAVAILABLE {
        if res.status() == StatusCode::OK {
            let g: Value = res.json().await?;
            give_back(app, g["id"].as_str().unwrap_or_default(), g["key"].as_str().unwrap_or_default(), &[]).await?;
        }
        return Ok(false);
    }
    let body: Value = res.json().await?;
    Ok(body["error"]["message"].as_str().unwrap_or_default().contains("banned"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_expires_and_a_repeat_lasts_twice_as_long() -> R {
    let (app, mut lease, _, b) = two_proxies("1").await?;
    // One proxy in service: every answer is about its ban.
    app.update_proxy(b, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    let (banned, key) = lease_for(&app, "shop.example").await?;
    give_back(&app, &banned, &key, &[("outcome", "captcha"), ("domain", "shop.example")]).await?;
    assert!(refused_for_bans(&app, "shop.example").await?, "banned for a second");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (again, key) = lease_for(&app, "shop.example").await?;
    assert_eq!(again, banned, "the ban expired");
    give_back(&app, &again, &key, &[("outcome", "blocked"), ("domain", "shop.example")]).await?;
    let d = wait_for_ban_count(&app, &banned, 2).await?;
    let ban = d.health.bans.iter().find(|b| b.domain == "shop.example").ok_or_else(|| anyhow::anyhow!("no ban"))?;
    assert_eq!((ban.count, ban.reason.as_str()), (2, "blocked"), "a repeat: {ban:?}");
    // Two seconds this time: still banned after one, over after two.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(refused_for_bans(&app, "shop.example").await?, "the second ban lasts twice as long");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(lease_for(&app, "shop.example").await?.0, banned, "and then expires");
    lease.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_stays_with_the_ip_when_the_proxy_rotates_and_follows_it_to_another_proxy() -> R {
    let (app, mut lease, a, b) = two_proxies("600").await?;
    let (banned, key) = lease_for(&app, "shop.example").await?;
    give_back(&app, &banned, &key, &[("outcome", "blocked"), ("domain", "shop.example")]).await?;
    let (banned_id, other_id) = if banned == a.to_hex() { (a, b) } else { (b, a) };
    let old_ip = app.proxy(&banned).await?.ip_public.unwrap_or_default();
    // The banned proxy gets a new public IP (a rotation, as the rotator stores it), and the other proxy the old one
    // (a provider recycling an IP).
    let set_ip = |ip: &str| doc! { "$set": { "ip_public": ip, "updatedAt": DateTime::now() } };
    app.update_proxy(banned_id, set_ip("198.51.100.77")).await?;
    app.update_proxy(other_id, set_ip(&old_ip)).await?;
    // The site is leased the rotated proxy, never the one now exiting on the banned IP.
    let seen = proxies_for(&app, "shop.example", 2).await?;
    assert_eq!(seen, vec![banned.clone(), banned.clone()], "the ban moved with the IP");
    lease.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_outcome_or_domain_is_a_400_naming_the_field_and_the_lease_stays_held() -> R {
    let (app, mut lease, _, _) = two_proxies("600").await?;
    let (id, key) = lease_for(&app, "shop.example").await?;
    for (query, field) in [
        (vec![("outcome", "banned")], "outcome"),
        (vec![("outcome", "blocked")], "domain"),
        (vec![("outcome", "ok"), ("domain", "not a host")], "domain"),
    ] {
        let res = give_back(&app, &id, &key, &query).await?;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{query:?}");
        let body: Value = res.json().await?;
        assert_eq!(body["error"]["field"], field, "{query:?}: {body}");
    }
    // The same over NATS.
    let bad = ReleaseRequest {
        proxy_id: Some(id.clone()),
        key: Some(key.clone()),
        outcome: Some("captcha".into()),
        domain: Some("x:y".into()),
        ..Default::default()
    };
    let e = app.call::<LeaseRelease>(&bad).await?.into_result().err();
    assert_eq!(e.as_ref().map(|e| (e.code, e.field.clone())), Some((ErrorCode::InvalidInput, Some("domain".into()))));
    // Still held: the lease is returned now, with the outcome in a JSON body.
    let res = app
        .http
        .post(app.url(&format!("/webhook/return-proxy/{id}")))
        .query(&[("key", key.as_str())])
        .header("Authorization", API_KEY)
        .json(&serde_json::json!({ "outcome": "blocked", "domain": "shop.example" }))
        .send()
        .await?;
    assert_eq!(res.status(), StatusCode::OK, "{}", res.text().await?);
    assert_eq!(wait_for_ban(&app, &id).await?.health.bans[0].domain, "shop.example");
    lease.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_and_quarantines_survive_a_leader_sigkill() -> R {
    let (app, mut leader, _, _) = two_proxies("600").await?;
    let mut standby = app.spawn_lease_process("health-standby", &[("BAN_BASE", "600".to_owned())], &[]).await?;
    // Over NATS this time, with the site on the acquire.
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some("scraper".into()),
        domain: Some("shop.example".into()),
        ..Default::default()
    };
    let g: LeaseGrant = app.call::<LeaseAcquire>(&req).await?.into_result().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let report = ReleaseRequest {
        proxy_id: Some(g.id.clone()),
        key: Some(g.key.clone()),
        outcome: Some("blocked".into()),
        domain: Some("shop.example".into()),
        ..Default::default()
    };
    app.call::<LeaseRelease>(&report).await?.into_result().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let seen = proxies_for(&app, "shop.example", 2).await?;
    assert!(seen.iter().all(|id| *id != g.id), "the ban: {seen:?} vs {}", g.id);
    // The other proxy failing three times in a row: quarantined (no rotator runs here to end it).
    for _ in 0..3 {
        let (id, key) = lease_for(&app, "shop.example").await?;
        give_back(&app, &id, &key, &[("outcome", "proxy_error")]).await?;
    }
    leader.kill().await;
    standby.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    // The new leader knows both: the site gets nothing (bans, not load), other sites only the banned proxy.
    assert!(refused_for_bans(&app, "shop.example").await?, "the ban or the quarantine was lost");
    assert_eq!(
        proxies_for(&app, "news.example", 2).await?,
        vec![g.id.clone(), g.id.clone()],
        "the quarantine was lost"
    );
    standby.kill().await;
    Ok(())
}

/// Leases over NATS in `vn` and returns with `outcome`: the proxy it got, or the refusal's code.
async fn lease_and_report(app: &TestApp, outcome: &str) -> R<Result<String, ErrorCode>> {
    let req = AcquireRequest { area: Some("vn".into()), consumer: Some("reporter".into()), ..Default::default() };
    let g = match app.call::<LeaseAcquire>(&req).await?.into_result() {
        Ok(g) => g,
        Err(e) => return Ok(Err(e.code)),
    };
    let report = ReleaseRequest {
        proxy_id: Some(g.id.clone()),
        key: Some(g.key.clone()),
        outcome: Some(outcome.into()),
        ..Default::default()
    };
    app.call::<LeaseRelease>(&report).await?.into_result().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(Ok(g.id))
}

/// Three `proxy_error`s in a row quarantine a proxy: no lease, a rotation at once; the rotation (its IP checked
/// through the proxy) ends the quarantine. So a consumer that keeps reporting a healthy proxy keeps it out for one
/// rotation at a time, no longer; and an `ok` between failures starts the count over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_a_row_quarantine_a_proxy_and_its_rotation_brings_it_back() -> R {
    let app = TestApp::builder().proxy_use_max(10).spawn().await?;
    let fake = proxypool_system_tests::fakes::FakeWorld::start().await?;
    let upstream = proxypool_system_tests::fakes::ForwardProxy::start("puser", "ppass").await?;
    fake.answer("q1", 200, "{}");
    // Not due for an hour: any rotation in this test is the quarantine's.
    let later = DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000);
    let id = app
        .insert_proxy_behind(Area::Vn, &upstream, fake.rotate_url("q1"), |d| {
            d.next_rotate = Some(later);
            d.rotate_time = 3_600;
        })
        .await?;
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    // Two failures, an ok, two failures: the ok started the count over, so still in the pool.
    for outcome in ["proxy_error", "timeout", "ok", "proxy_error", "timeout"] {
        assert_eq!(lease_and_report(&app, outcome).await?, Ok(id.to_hex()), "{outcome}");
    }
    assert_eq!(fake.calls("q1"), 0, "no rotation yet");
    // The third in a row: quarantined, out of the pool until the rotation (checked through the proxy) judges it.
    assert_eq!(lease_and_report(&app, "proxy_error").await?, Ok(id.to_hex()));
    assert!(out_until_judged(&app).await? >= 1, "the quarantined proxy was leased before its rotation");
    assert_eq!(fake.calls("q1"), 1, "the quarantine rotated it, once");
    // A consumer that keeps reporting the healthy proxy as failing keeps it out for one check each time, no longer.
    for _ in 0..3 {
        assert_eq!(lease_and_report(&app, "proxy_error").await?, Ok(id.to_hex()));
    }
    assert!(out_until_judged(&app).await? >= 1, "quarantined again");
    assert_eq!(fake.calls("q1"), 2, "and judged again, by one more rotation");
    let d = app.proxy(&id.to_hex()).await?;
    assert!(d.ip_public.is_some(), "the rotation checked the new IP through the proxy: {d:?}");
    app.settle().await;
    let d = app.proxy(&id.to_hex()).await?;
    assert_eq!((d.health.state.as_str(), d.health.fails), ("healthy", 0), "{:?}", d.health);
    // Its record: 3 ok and 8 failures reported (the `ok`s that found it out of the pool leased nothing).
    assert_eq!((d.health.recent_count, d.health.success_rate), (11, Some(3.0 / 11.0)), "{:?}", d.health);
    rotator.stop().await;
    app.shutdown().await;
    Ok(())
}

/// Leases (reporting `ok`) until the pool's one proxy is leased again, within 20 s: how many acquires were refused
/// meanwhile (each `no_proxy_available`).
async fn out_until_judged(app: &TestApp) -> R<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut refused = 0;
    loop {
        match lease_and_report(app, "ok").await? {
            Err(code) => {
                assert_eq!(code, ErrorCode::NoProxyAvailable);
                refused += 1;
            }
            Ok(_) => return Ok(refused),
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "still out of the pool after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An admin lifts a site's ban of an exit IP and a quarantine; each is leased again at once, and lifting what is not
/// there is a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_lifts_a_ban_and_a_quarantine() -> R {
    let (app, mut lease, _, b) = two_proxies("600").await?;
    app.update_proxy(b, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    let (id, key) = lease_for(&app, "shop.example").await?;
    give_back(&app, &id, &key, &[("outcome", "blocked"), ("domain", "shop.example")]).await?;
    assert!(refused_for_bans(&app, "shop.example").await?);
    let admin = |method: reqwest::Method, path: String| {
        app.http.request(method, app.url(&path)).header("Authorization", API_KEY).send()
    };
    let res = admin(reqwest::Method::DELETE, format!("/api/proxies/{id}/bans/Shop.Example")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await?;
    assert_eq!((body["bans_lifted"].as_u64(), body["ip"].as_str()), (Some(1), Some("198.51.100.1")), "{body}");
    assert_eq!(lease_for(&app, "shop.example").await?.0, id, "leased for the site again");
    let res = admin(reqwest::Method::DELETE, format!("/api/proxies/{id}/bans/shop.example")).await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "no ban left to lift");
    let res = admin(reqwest::Method::DELETE, format!("/api/proxies/{id}/bans/not%20a%20host")).await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // Three failures in a row: quarantined (no rotator runs here, so only the admin can bring it back).
    for _ in 0..3 {
        let (got, key) = lease_for(&app, "shop.example").await?;
        give_back(&app, &got, &key, &[("outcome", "proxy_error")]).await?;
    }
    assert_eq!(get_for(&app, "shop.example").await?.status(), StatusCode::SERVICE_UNAVAILABLE, "quarantined");
    // The admin listing shows it, filtered by health, with why it takes no lease (the projection trails a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let res = admin(reqwest::Method::GET, "/api/proxies?health=quarantined".to_owned()).await?;
        let page: Value = res.json().await?;
        let items = page["data"].as_array().cloned().unwrap_or_default();
        if !items.is_empty() || std::time::Instant::now() > deadline {
            break items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(
        (listed[0]["health"]["state"].as_str(), listed[0]["not_leasable"].as_str()),
        (Some("quarantined"), Some("quarantined"))
    );
    assert_eq!(listed[0]["health"]["fails"], 3);
    let res = admin(reqwest::Method::GET, "/api/proxies?health=sick".to_owned()).await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = admin(reqwest::Method::DELETE, format!("/api/proxies/{id}/quarantine")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(lease_for(&app, "shop.example").await?.0, id, "back in the pool");
    // One proxy in detail: its lease, read from the lease service at once (not from the projection).
    let res = admin(reqwest::Method::GET, format!("/api/proxies/{id}")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let detail: Value = res.json().await?;
    let live = &detail["live"];
    // Two leases held: the one after the unban and this one.
    let ids = (detail["id"].as_str(), live["in_use"].as_u64(), live["leases"].as_array().map(Vec::len));
    assert_eq!((ids, live["max"].as_u64()), ((Some(id.as_str()), Some(2), Some(2)), Some(10)), "{detail}");
    assert_eq!(live["leases"][0]["consumer"], "127.0.0.1", "{detail}");
    assert_eq!((live["health"]["state"].as_str(), live["health"]["fails"].as_u64()), (Some("healthy"), Some(0)));
    assert_eq!(live["exit_ip"], "198.51.100.1");
    assert_eq!(live["health"]["success_rate"], 0.0, "three proxy_errors, no ok (the block is the site's): {detail}");
    assert!(live["leases"][0].get("key").is_none(), "a holder's key is not shown: {detail}");
    assert!(detail.get("password").is_none_or(Value::is_null), "secrets only with get_full: {detail}");
    let missing = admin(reqwest::Method::GET, format!("/api/proxies/{}", ObjectId::new())).await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let res = admin(reqwest::Method::DELETE, format!("/api/proxies/{id}/quarantine")).await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "not quarantined any more");
    lease.kill().await;
    Ok(())
}

/// A holder asks for a new IP: its lease ends, the proxy is rotated (after the other holders are drained), and a
/// second request within `ROTATE_MIN_INTERVAL` is a 429 with `Retry-After` that leaves its lease held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_asks_for_a_new_ip_at_most_once_per_interval() -> R {
    let app = TestApp::builder().proxy_use_max(3).spawn().await?;
    let fake = proxypool_system_tests::fakes::FakeWorld::start().await?;
    let upstream = proxypool_system_tests::fakes::ForwardProxy::start("puser", "ppass").await?;
    fake.answer("r1", 200, "{}");
    let later = DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000);
    let id = app
        .insert_proxy_behind(Area::Vn, &upstream, fake.rotate_url("r1"), |d| {
            d.next_rotate = Some(later);
            d.rotate_time = 3_600;
        })
        .await?
        .to_hex();
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    let (first, first_key) = lease_for(&app, "shop.example").await?;
    let (second, second_key) = lease_for(&app, "shop.example").await?;
    assert_eq!((first.as_str(), second.as_str()), (id.as_str(), id.as_str()));
    let ask = |key: String| {
        app.http
            .post(app.url(&format!("/webhook/rotate-proxy/{id}")))
            .query(&[("key", key)])
            .header("Authorization", API_KEY)
            .send()
    };
    let res = ask(first_key.clone()).await?;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let body: Value = res.json().await?;
    assert_eq!(body["in_use"], 1, "the other holder is still there: {body}");
    assert_eq!(give_back(&app, &id, &first_key, &[]).await?.status(), StatusCode::NOT_FOUND, "its lease ended");
    // The second holder asks too, within the interval: refused, with the wait, and its lease is still held.
    let res = ask(second_key.clone()).await?;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    assert!((1..=30).contains(&wait), "Retry-After {wait}");
    let body: Value = res.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(give_back(&app, &id, &second_key, &[]).await?.status(), StatusCode::OK, "still held after the 429");
    // Drained, the proxy rotates once.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = app.proxy(&id).await?;
        if fake.calls("r1") == 1 && !d.is_rotating && d.ip_public.is_some() {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "not rotated: {} calls, {d:?}", fake.calls("r1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rotator.stop().await;
    app.shutdown().await;
    Ok(())
}

/// Waits until MongoDB shows proxy `id` with public IP `ip` and health state `state`.
async fn wait_for_rotation(app: &TestApp, id: ObjectId, ip: &str, state: &str) -> R<proxypool_store::model::ProxyDoc> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = app.proxy(&id.to_hex()).await?;
        if d.ip_public.as_deref() == Some(ip) && d.health.state == state && !d.is_rotating {
            return Ok(d);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no rotation to {ip} ({state}) in 20 s: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two modems behind one carrier NAT: a rotation that gives a proxy the public IP another active proxy exits on is
/// tried again; one that still does after `ROTATE_UNIQUE_TRIES` more leaves the proxy out of the pool, marked
/// `duplicate_ip` with the other's id, until a rotation gives it an IP of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_to_another_proxys_ip_rotates_again_and_a_lasting_duplicate_is_not_leased() -> R {
    let app = TestApp::builder().proxy_use_max(10).spawn().await?;
    let fake = proxypool_system_tests::fakes::FakeWorld::start().await?;
    let upstream = proxypool_system_tests::fakes::ForwardProxy::start("puser", "ppass").await?;
    let later = DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000);
    // The proxy already on 203.0.113.50, not due in this test.
    let first = app
        .insert_proxy_with(Area::Vn, |d| {
            d.ip_public = Some("203.0.113.50".into());
            d.next_rotate = Some(later);
        })
        .await?;
    // The provider hands the rotating proxy the first one's IP once, then one of its own.
    fake.hand_out_ips("dup", &["203.0.113.50", "203.0.113.51"]);
    let second =
        app.insert_proxy_behind(Area::Vn, &upstream, fake.rotate_url("dup"), |d| d.rotate_time = 3_600).await?;
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    wait_for_rotation(&app, second, "203.0.113.51", "healthy").await?;
    assert_eq!(fake.calls("dup"), 2, "rotated again once, after the duplicate");
    // Now one that stays a duplicate: the first try and three more all give .50.
    fake.hand_out_ips("dup", &["203.0.113.50"; 4]);
    let now = proxypool_contracts::rotation::RotateNowRequest { proxy_id: second.to_hex() };
    app.call::<proxypool_contracts::endpoints::RotateNow>(&now).await?;
    let d = wait_for_rotation(&app, second, "203.0.113.50", "duplicate_ip").await?;
    assert_eq!(fake.calls("dup"), 6, "1 + ROTATE_UNIQUE_TRIES (3) rotations");
    assert_eq!(d.health.duplicate_of.as_deref(), Some(first.to_hex().as_str()), "{:?}", d.health);
    let listed: Value = app
        .http
        .get(app.url("/api/proxies?health=duplicate_ip"))
        .header("Authorization", API_KEY)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(listed["data"][0]["id"], second.to_hex().as_str(), "{listed}");
    assert_eq!(listed["data"][0]["not_leasable"], "duplicate_ip", "{listed}");
    assert_eq!(listed["data"][0]["health"]["duplicate_of"], first.to_hex().as_str(), "{listed}");
    // Not leased: every lease goes to the first proxy.
    for _ in 0..3 {
        let (id, key) = lease_for(&app, "any.example").await?;
        assert_eq!(id, first.to_hex(), "the duplicate was leased");
        give_back(&app, &id, &key, &[]).await?;
    }
    let metrics = app.http.get(format!("http://{}/metrics", rotator.admin_addr)).send().await?.text().await?;
    assert!(metrics.contains("proxypool_rotator_duplicate_ips_total 5"), "{metrics}");
    // Its next rotation gives it an IP of its own: back in the pool.
    fake.hand_out_ips("dup", &["203.0.113.52"]);
    app.call::<proxypool_contracts::endpoints::RotateNow>(&now).await?;
    wait_for_rotation(&app, second, "203.0.113.52", "healthy").await?;
    app.update_proxy(first, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    let (id, key) = lease_for(&app, "any.example").await?;
    assert_eq!(id, second.to_hex());
    give_back(&app, &id, &key, &[]).await?;
    rotator.stop().await;
    app.shutdown().await;
    Ok(())
}
