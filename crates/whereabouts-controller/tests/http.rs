//! The metrics and health server over real sockets, spoken to in raw HTTP/1.1: status codes, the
//! OpenMetrics content type, the metrics' values, readiness following its receiver, and a graceful
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use whereabouts_controller::http;
use whereabouts_controller::metrics::{self, Metrics};

/// An answer: status code, headers (names lowercased), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// Sends `method path` with `Connection: close` and reads the whole answer (not chunked: every
/// answer here has a known length).
async fn request(address: SocketAddr, method: &str, path: &str) -> Answer {
    let mut stream = TcpStream::connect(address).await.expect("connecting");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("sending");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .expect("an answer in time")
        .expect("reading");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines.next().and_then(|line| line.split(' ').nth(1)).expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Answer { status: status.parse().expect("a status code"), headers, body: body.to_owned() }
}

struct Server {
    address: SocketAddr,
    ready: watch::Sender<bool>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(metrics: Arc<Metrics>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let address = listener.local_addr().expect("the address");
    let (ready, receiver) = watch::channel(false);
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(http::serve(listener, metrics, receiver, async {
        let _ = stopped.await;
    }));
    Server { address, ready, shutdown, task }
}

#[tokio::test]
async fn serves_metrics_health_and_readiness() {
    let metrics = Arc::new(Metrics::new());
    metrics.leader.set(1);
    metrics.cas_conflicts.inc_by(7);
    let server = start(metrics.clone()).await;

    let answer = request(server.address, "GET", "/metrics").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some(metrics::CONTENT_TYPE));
    assert!(answer.body.contains("\nwhereabouts_leader 1\n"), "{}", answer.body);
    assert!(answer.body.contains("\nwhereabouts_cas_conflicts_total 7\n"), "{}", answer.body);
    assert!(answer.body.ends_with("# EOF\n"), "{}", answer.body);
    // Read at every request, not once.
    metrics.leader.set(0);
    assert!(request(server.address, "GET", "/metrics").await.body.contains("\nwhereabouts_leader 0\n"));

    let answer = request(server.address, "GET", "/healthz").await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));

    let answer = request(server.address, "GET", "/readyz").await;
    assert_eq!((answer.status, answer.body.as_str()), (503, "not ready"));
    server.ready.send_replace(true);
    let answer = request(server.address, "GET", "/readyz").await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    server.ready.send_replace(false);
    assert_eq!(request(server.address, "GET", "/readyz").await.status, 503);

    assert_eq!(request(server.address, "GET", "/").await.status, 404);
    assert_eq!(request(server.address, "GET", "/metricsz").await.status, 404);
    assert_eq!(request(server.address, "POST", "/healthz").await.status, 405);

    server.shutdown.send(()).expect("the server is running");
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.task).await;
    stopped.expect("stops on shutdown").expect("the server task").expect("served without error");
    assert!(TcpStream::connect(server.address).await.is_err(), "still listening after shutdown");
}
