//! The work-queue runner against a real `nats-server -js`: a message is acknowledged only on `Done`; a handler that
//! panics (its guard dropped without a verdict) or asks to retry gets the message again, well before the ack wait;
//! a rejected message is not redelivered; shutdown waits for the message in hand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxypool_rpc::jetstream::{Delivery, WorkQueue};
use proxypool_rpc::workqueue::{self, Outcome, RunnerOptions};
use proxypool_settings::shutdown::Shutdown;
use proxypool_test_support::NatsServer;

type R<T = ()> = anyhow::Result<T>;

/// A test-only queue, outside the product's streams.
const QUEUE: WorkQueue = WorkQueue {
    stream: "TEST_WORKQUEUE",
    subject: "test.workqueue.jobs",
    consumer: "test-workers",
    description: "test",
};

/// Ack wait far longer than the test waits: a redelivery seen in time is the runner's NAK, not the server's timeout.
const ACK_WAIT: Duration = Duration::from_secs(30);

fn options() -> RunnerOptions {
    RunnerOptions {
        name: "test.job",
        concurrency: 4,
        ack_wait: ACK_WAIT,
        max_deliver: 5,
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        drain: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_panics_and_shutdown() -> R {
    let nats = NatsServer::start()?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let consumer =
        QUEUE.ensure_consumer(&js, Delivery { ack_wait: ACK_WAIT, max_deliver: 5, backoff: false }, 1).await?;
    for job in ["panic-once", "retry-once", "reject", "slow"] {
        QUEUE.publish(&js, job, &job.to_owned()).await?;
    }
    // Every delivery seen, as (job, attempt).
    let seen: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let finished_slow = Arc::new(AtomicUsize::new(0));
    let (trigger, shutdown) = Shutdown::new();
    let (s, f) = (seen.clone(), finished_slow.clone());
    let runner = tokio::spawn(workqueue::run(consumer, options(), shutdown, move |job: String, attempt| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((job.clone(), attempt));
            match (job.as_str(), attempt) {
                ("panic-once", 1) => panic!("a handler that dies mid-job"),
                ("retry-once", 1) => Outcome::Retry("transient".into()),
                ("reject", _) => Outcome::Reject("never".into()),
                ("slow", _) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    f.fetch_add(1, Ordering::SeqCst);
                    Outcome::Done
                }
                _ => Outcome::Done,
            }
        }
    }));
    let started = Instant::now();
    let deliveries = |job: &str| {
        seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().filter(|(j, _)| j == job).count()
    };
    while deliveries("panic-once") < 2 || deliveries("retry-once") < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "no redelivery in 10 s: {:?}", seen.lock());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Redelivered by the runner's NAK, long before the 30 s ack wait would have.
    assert!(started.elapsed() < Duration::from_secs(10));
    // Shutdown while `slow` is in hand: the runner waits for it.
    trigger.fire();
    runner.await?;
    assert_eq!(finished_slow.load(Ordering::SeqCst), 1, "shutdown did not wait for the job in hand");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deliveries("reject"), 1, "a rejected message came back");
    assert_eq!(deliveries("panic-once"), 2);
    assert_eq!(deliveries("retry-once"), 2);
    // Everything was acknowledged or terminated: the work queue is empty.
    assert_eq!(QUEUE.depth(&js).await, Some(0));
    Ok(())
}
