//! `wicket-demo-app`: the small HTTP service of `wicket_testkit::httpapp`
//! (a JSON API holding personal data), as a process, for `cargo xtask demo`
//! and `cargo xtask bench http`.
//!
//! `--listen HOST:PORT` (default 127.0.0.1:7488); `--api-key-file FILE`
//! makes it refuse requests without `X-Api-Key: <contents>`. Prints
//! `ready http://…` once it listens.

use wicket_testkit::arg;
use wicket_testkit::httpapp::DemoApp;

fn main() {
    let threads: usize = arg("--threads").and_then(|t| t.parse().ok()).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:7488".into());
        let key = arg("--api-key-file").map(|f| {
            let v = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("cannot read {f}: {e}"));
            ("x-api-key".to_string(), v.trim().to_string())
        });
        let app = DemoApp::start(&listen, key, false).await;
        println!("ready {}", app.url());
        let _ = tokio::signal::ctrl_c().await;
    });
}
