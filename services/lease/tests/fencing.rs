//! The lease log's fence, against a real nats-server: of two replicas that both believe they lead, only the one
//! whose append names the log's true last sequence is stored; the other is refused, catches up from the log, and
//! only then can append. Deterministic: the two appends are made one after the other, no race is needed.

use std::time::Duration;

use bson::oid::ObjectId;
use futures::StreamExt;
use proxypool_lease::engine::log::{AppendError, Batch, LeaseLog};
use proxypool_lease::engine::state::{Lease, Op};
use proxypool_test_support::servers::NatsServer;

fn grant(proxy: ObjectId, key: &str) -> Op {
    let lease = Lease {
        key: key.into(),
        consumer: "c".into(),
        at_ms: 1,
        callback_url: None,
        door: None,
        session: None,
        request: None,
        renewed_ms: None,
    };
    Op::Grant { proxy, lease, webhook_url: "http://w".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_append_is_refused_and_it_must_catch_up() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let a_client = async_nats::connect(nats.url()).await?;
    let b_client = async_nats::connect(nats.url()).await?;
    let a = LeaseLog::open(&a_client, 1, Duration::from_secs(2), "db").await?;
    let b = LeaseLog::open(&b_client, 1, Duration::from_secs(2), "db").await?;
    let proxy = ObjectId::new();

    // Both start from the same end of the log.
    let (_, start) = a.bounds().await?;
    assert_eq!(b.bounds().await?.1, start);

    // A leads and appends.
    let first = Batch::new("a", 1, 1, vec![grant(proxy, "k1")]);
    let seq = a.append(start, &first).await?;
    assert_eq!(seq, start + 1);

    // B still believes it leads, from the old end: refused, and nothing of its batch is stored.
    let stale = Batch::new("b", 2, 1, vec![grant(proxy, "k2")]);
    match b.append(start, &stale).await {
        Err(AppendError::Fenced { expected }) => assert_eq!(expected, start),
        other => panic!("a deposed leader's append was not fenced: {other:?}"),
    }
    assert_eq!(b.bounds().await?.1, seq, "the refused batch was not stored");

    // Its way back: read what it missed, then append after it.
    let mut missed = b.read_from(start + 1).await?;
    let next = missed.next().await.ok_or_else(|| anyhow::anyhow!("log ended"))?;
    let (read_seq, read) = next.map_err(anyhow::Error::msg)?;
    assert_eq!((read_seq, &read), (seq, &first));
    let retried = b.append(read_seq, &stale).await?;
    assert_eq!(retried, seq + 1);

    // And now A, in its turn, is the stale one.
    assert!(matches!(a.append(seq, &first).await, Err(AppendError::Fenced { .. })));
    Ok(())
}
