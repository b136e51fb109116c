//! The `caching_proxy` binary out of file descriptors: with a descriptor limit of 64 and
//! more connections open than that, `accept` fails (EMFILE); once they close, the
//! proxy answers again (it used to exit on the first failed `accept`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::process::{example_binary, free_port, listening, Running};
use support::{eventually, fetch, Origin};

#[tokio::test]
async fn the_proxy_keeps_serving_after_running_out_of_descriptors() {
    let origin = Origin::new();
    let upstream = origin.spawn().await;
    let port = free_port();
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .arg(example_binary("caching_proxy"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &format!("http://{upstream}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log, read as it comes.
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn({
        let log = Arc::clone(&log);
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    let mut proxy = Running::new(child);
    eventually("the proxy to listen", Duration::from_secs(20), || {
        listening(port)
    })
    .await;
    let client = support::client();
    let host = [("host", "jobs.example")];
    let url = format!("http://127.0.0.1:{port}/jobs/1");
    assert_eq!(fetch(&client, "GET", &url, &host).await.status, 200);

    // More connections than it has descriptors: the kernel queues the ones it cannot
    // take, and its `accept` fails until some close.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    eventually(
        "accept to fail for want of descriptors",
        Duration::from_secs(20),
        || {
            let log = Arc::clone(&log);
            async move { log.lock().unwrap().contains("accept failed") }
        },
    )
    .await;
    drop(flood);

    eventually(
        "the proxy to answer again",
        Duration::from_secs(20),
        || async {
            let client = support::client();
            fetch(&client, "GET", &url, &host).await.status == 200
        },
    )
    .await;
    assert!(
        proxy.exited().is_none(),
        "the proxy exited: {}",
        log.lock().unwrap()
    );
}
