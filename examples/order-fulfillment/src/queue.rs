//! The order-event queue the consumer reads through the task API: an in-process channel by
//! default; with the `redis` feature and `[queue] redis_url`, a Redis stream read by a
//! consumer group.
//!
//! On Redis, each entry goes to one consumer of the group. A consumer acknowledges an entry
//! (`XACK`) once the task API has applied the event or kept it (the fallback's store holds a
//! kept event from then on), and leaves a failed one pending. Entries pending for longer than
//! `claim_idle_ms` (their consumer died or failed them) are taken over by another consumer
//! (`XAUTOCLAIM`) and handled again: at-least-once delivery, exactly-once in effect because
//! the handler is keyed by the event's sequence number.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tower_degrade::BoxError;

use crate::config::QueueSection;
use crate::shop::OrderEvent;

/// An event taken from the queue.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) event: OrderEvent,
    /// When the event was due, from the storm's start.
    pub(crate) due: Duration,
    /// Its first delivery (false: taken over from a consumer that did not acknowledge it).
    pub(crate) first: bool,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    entry: Option<String>,
}

type Channel = Arc<Mutex<mpsc::Receiver<(OrderEvent, Duration)>>>;

/// The producer's side of the queue, and where consumers come from.
#[derive(Clone, Debug)]
pub(crate) enum EventQueue {
    Channel(Option<mpsc::Sender<(OrderEvent, Duration)>>, Channel),
    #[cfg(feature = "redis")]
    Redis(Arc<streams::Streams>),
}

impl EventQueue {
    /// The queue `section` describes; `run` names this run's stream on Redis.
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    pub(crate) async fn open(section: &QueueSection, run: &str) -> Result<EventQueue, BoxError> {
        match &section.redis_url {
            #[cfg(feature = "redis")]
            Some(url) => Ok(EventQueue::Redis(Arc::new(
                streams::Streams::open(url, run, section.claim_idle()).await?,
            ))),
            #[cfg(not(feature = "redis"))]
            Some(_) => {
                Err("queue.redis_url needs the example built with `--features redis`".into())
            }
            None => {
                let (tx, rx) = mpsc::channel(100_000);
                Ok(EventQueue::Channel(Some(tx), Arc::new(Mutex::new(rx))))
            }
        }
    }

    /// What the queue is, for the run's header.
    pub(crate) fn describe(&self) -> String {
        match self {
            EventQueue::Channel(..) => "an in-process channel".to_owned(),
            #[cfg(feature = "redis")]
            EventQueue::Redis(s) => s.describe(),
        }
    }

    /// Publishes `event`, due at `due`.
    pub(crate) async fn push(&self, event: OrderEvent, due: Duration) -> Result<(), BoxError> {
        match self {
            EventQueue::Channel(tx, _) => {
                let tx = tx.as_ref().ok_or("the queue is closed")?;
                tx.try_send((event, due)).map_err(|e| e.to_string().into())
            }
            #[cfg(feature = "redis")]
            EventQueue::Redis(s) => s.push(event, due).await,
        }
    }

    /// No more events: consumers stop once they have taken what is there.
    pub(crate) fn close(&mut self) {
        match self {
            EventQueue::Channel(tx, _) => *tx = None,
            #[cfg(feature = "redis")]
            EventQueue::Redis(s) => s.close(),
        }
    }

    /// Consumer number `n`.
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    pub(crate) async fn consumer(&self, n: usize) -> Result<Consumer, BoxError> {
        match self {
            EventQueue::Channel(_, rx) => Ok(Consumer::Channel(rx.clone())),
            #[cfg(feature = "redis")]
            EventQueue::Redis(s) => Ok(Consumer::Redis(s.consumer(n).await?)),
        }
    }

    /// Removes what the queue left behind (the run's stream on Redis); returns how many events
    /// were never acknowledged.
    pub(crate) async fn remove(&self) -> Result<u64, BoxError> {
        match self {
            EventQueue::Channel(..) => Ok(0),
            #[cfg(feature = "redis")]
            EventQueue::Redis(s) => s.remove().await,
        }
    }
}

/// One consumer of the queue.
#[derive(Debug)]
pub(crate) enum Consumer {
    Channel(Channel),
    #[cfg(feature = "redis")]
    Redis(streams::StreamConsumer),
}

impl Consumer {
    /// The next event; `None` once the queue is closed and nothing is left to take.
    pub(crate) async fn next(&mut self) -> Result<Option<Delivery>, BoxError> {
        match self {
            Consumer::Channel(rx) => {
                Ok(rx.lock().await.recv().await.map(|(event, due)| Delivery {
                    event,
                    due,
                    first: true,
                    entry: None,
                }))
            }
            #[cfg(feature = "redis")]
            Consumer::Redis(c) => c.next().await,
        }
    }

    /// The event is applied or kept: the queue may forget it.
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    pub(crate) async fn ack(&mut self, delivery: &Delivery) -> Result<(), BoxError> {
        match self {
            Consumer::Channel(_) => Ok(()),
            #[cfg(feature = "redis")]
            Consumer::Redis(c) => c.ack(delivery).await,
        }
    }
}

#[cfg(feature = "redis")]
mod streams {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use redis::AsyncCommands;
    use redis::aio::MultiplexedConnection;
    use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
    use tower_degrade::BoxError;

    use super::Delivery;
    use crate::shop::OrderEvent;

    const GROUP: &str = "order-fulfillment";
    /// How long a consumer's read waits for an entry before it looks at the rest again.
    const BLOCK_MS: usize = 100;

    /// A stream and its consumer group.
    #[derive(Debug)]
    pub(crate) struct Streams {
        client: redis::Client,
        url: String,
        key: String,
        producer: MultiplexedConnection,
        claim_idle: Duration,
        closed: AtomicBool,
    }

    impl Streams {
        pub(crate) async fn open(
            url: &str,
            run: &str,
            claim_idle: Duration,
        ) -> Result<Streams, BoxError> {
            let named = |e: redis::RedisError| -> BoxError {
                format!("queue.redis_url `{url}`: {e}").into()
            };
            let client = redis::Client::open(url).map_err(named)?;
            let mut producer = client
                .get_multiplexed_async_connection()
                .await
                .map_err(named)?;
            let key = format!("order-fulfillment:events:{run}");
            let _: () = producer
                .xgroup_create_mkstream(&key, GROUP, "0")
                .await
                .map_err(named)?;
            Ok(Streams {
                client,
                url: url.to_owned(),
                key,
                producer,
                claim_idle,
                closed: AtomicBool::new(false),
            })
        }

        pub(crate) fn describe(&self) -> String {
            format!("Redis stream `{}` on {}", self.key, self.url)
        }

        pub(crate) async fn push(&self, event: OrderEvent, due: Duration) -> Result<(), BoxError> {
            let mut conn = self.producer.clone();
            let fields = [("seq", event.seq), ("due_us", due.as_micros() as u64)];
            let _: Option<String> = conn.xadd(&self.key, "*", &fields).await?;
            Ok(())
        }

        pub(crate) fn close(&self) {
            self.closed.store(true, Ordering::Release);
        }

        /// A consumer on a connection of its own: its blocking reads hold up no one else.
        pub(crate) async fn consumer(
            self: &std::sync::Arc<Self>,
            n: usize,
        ) -> Result<StreamConsumer, BoxError> {
            Ok(StreamConsumer {
                streams: self.clone(),
                conn: self.client.get_multiplexed_async_connection().await?,
                name: format!("consumer-{n}-{}", std::process::id()),
                cursor: "0-0".to_owned(),
                last_claim: None,
            })
        }

        pub(crate) async fn remove(&self) -> Result<u64, BoxError> {
            let mut conn = self.producer.clone();
            let pending: redis::streams::StreamPendingReply =
                conn.xpending(&self.key, GROUP).await?;
            let _: () = conn.del(&self.key).await?;
            Ok(pending.count() as u64)
        }
    }

    /// One member of the consumer group.
    #[derive(Debug)]
    pub(crate) struct StreamConsumer {
        streams: std::sync::Arc<Streams>,
        conn: MultiplexedConnection,
        name: String,
        cursor: String,
        last_claim: Option<Instant>,
    }

    impl StreamConsumer {
        pub(crate) async fn next(&mut self) -> Result<Option<Delivery>, BoxError> {
            let s = self.streams.clone();
            loop {
                // Entries another consumer left pending too long, now and then.
                if self
                    .last_claim
                    .is_none_or(|t| t.elapsed() >= s.claim_idle / 4)
                {
                    self.last_claim = Some(Instant::now());
                    let reply: redis::streams::StreamAutoClaimReply = self
                        .conn
                        .xautoclaim_options(
                            &s.key,
                            GROUP,
                            &self.name,
                            s.claim_idle.as_millis() as u64,
                            &self.cursor,
                            StreamAutoClaimOptions::default().count(1),
                        )
                        .await?;
                    self.cursor = reply.next_stream_id;
                    if let Some(e) = reply.claimed.into_iter().next() {
                        tracing::warn!(stream = %s.key, consumer = %self.name, entry = %e.id,
                            "took over an event left pending by another consumer");
                        if let Some(d) = decode(&s.key, e, false) {
                            return Ok(Some(d));
                        }
                        continue;
                    }
                }
                let closed = s.closed.load(Ordering::Acquire);
                let options = StreamReadOptions::default()
                    .group(GROUP, &self.name)
                    .count(1)
                    .block(BLOCK_MS);
                let reply: Option<StreamReadReply> =
                    self.conn.xread_options(&[&s.key], &[">"], &options).await?;
                let entry = reply
                    .and_then(|r| r.keys.into_iter().next())
                    .and_then(|k| k.ids.into_iter().next());
                match entry {
                    Some(e) => {
                        if let Some(d) = decode(&s.key, e, true) {
                            return Ok(Some(d));
                        }
                    }
                    // Closed before this read, and it found nothing: nothing more will come.
                    None if closed => return Ok(None),
                    None => {}
                }
            }
        }

        pub(crate) async fn ack(&mut self, delivery: &Delivery) -> Result<(), BoxError> {
            let Some(entry) = &delivery.entry else {
                return Ok(());
            };
            let _: usize = self.conn.xack(&self.streams.key, GROUP, &[entry]).await?;
            Ok(())
        }
    }

    /// The entry as an event; `None` (logged, the entry left pending for a person to look
    /// at) when it is not one this service wrote.
    fn decode(key: &str, e: StreamId, first: bool) -> Option<Delivery> {
        let (Some(seq), Some(due_us)) = (e.get::<u64>("seq"), e.get::<u64>("due_us")) else {
            tracing::error!(stream = %key, entry = %e.id,
                "an entry without the numbers `seq` and `due_us` is left pending");
            return None;
        };
        Some(Delivery {
            event: OrderEvent { seq },
            due: Duration::from_micros(due_us),
            first,
            entry: Some(e.id),
        })
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use std::process::{Child, Command, Stdio};

    use super::*;

    /// A `redis-server` on a free port (Debian's; `scripts/test` installs it), killed when
    /// dropped.
    struct Server(Child, u16);

    impl Server {
        fn start() -> Server {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/test installs it)");
            let server = Server(child, port);
            for _ in 0..200 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("redis-server did not start on port {port}");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn each_event_is_handled_and_one_a_consumer_dropped_is_taken_over() {
        let server = Server::start();
        let section = QueueSection {
            redis_url: Some(format!("redis://127.0.0.1:{}", server.1)),
            claim_idle_ms: Some(200),
        };
        let mut queue = EventQueue::open(&section, "test").await.unwrap();
        for seq in 0..20 {
            queue
                .push(OrderEvent { seq }, Duration::from_millis(seq))
                .await
                .unwrap();
        }

        // A consumer takes an event and dies before acknowledging it.
        let mut dead = queue.consumer(0).await.unwrap();
        let lost = dead.next().await.unwrap().unwrap();
        assert!(lost.first);
        drop(dead);

        // Another handles the rest, then takes over the dead one's event once it has been
        // pending for claim_idle_ms.
        let mut live = queue.consumer(1).await.unwrap();
        let mut seen = vec![lost.event.seq];
        let mut again = None;
        while again.is_none() {
            let d = live.next().await.unwrap().unwrap();
            assert_eq!(d.due, Duration::from_millis(d.event.seq));
            live.ack(&d).await.unwrap();
            if d.first {
                seen.push(d.event.seq);
            } else {
                again = Some(d.event.seq);
            }
        }
        assert_eq!(again, Some(lost.event.seq));
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..20).collect::<Vec<_>>(),
            "each event once at first"
        );

        queue.close();
        assert!(live.next().await.unwrap().is_none(), "closed and empty");
        assert_eq!(queue.remove().await.unwrap(), 0, "everything acknowledged");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_naming_the_setting() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let section = QueueSection {
            redis_url: Some(format!("redis://127.0.0.1:{port}")),
            claim_idle_ms: None,
        };
        let e = EventQueue::open(&section, "test")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("queue.redis_url `redis://127.0.0.1:"), "{e}");
    }
}
