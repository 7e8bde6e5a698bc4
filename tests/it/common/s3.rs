//! An S3 server for tests and benchmarks: `s3s` over `s3s-fs` (objects are files under a
//! directory, `ROOT/BUCKET/KEY`) on a loopback port, in this process.
#![allow(dead_code)] // each user (tests/remote.rs, examples/s3_server.rs) needs part of it

use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// A running server; it stops when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _runtime: tokio::runtime::Runtime,
}

impl S3Server {
    /// Serves the buckets (folders) of `root`, creating `bucket`, to clients signing with
    /// this access key and secret.
    pub fn start(root: &Path, bucket: &str, access_key: &str, secret: &str) -> S3Server {
        Self::start_on(root, bucket, access_key, secret, 0)
    }

    /// [`S3Server::start`] on a given port (0: any free one).
    pub fn start_on(
        root: &Path,
        bucket: &str,
        access_key: &str,
        secret: &str,
        port: u16,
    ) -> S3Server {
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let mut b = S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
        b.set_auth(SimpleAuth::from_single(access_key, secret));
        let service = b.build();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        runtime.spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            _runtime: runtime,
        }
    }

    /// The AWS environment a client needs to reach this server.
    pub fn env(&self, access_key: &str, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", access_key.to_string()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }
}
