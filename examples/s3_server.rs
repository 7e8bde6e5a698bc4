//! A local S3 server for trying remote caches and measuring transfers:
//! `cargo run --release --example s3_server -- DIR [PORT]` serves the folders of DIR as
//! buckets (creating `mergesmith`) at http://127.0.0.1:PORT, for the access key
//! `mergesmith` and the secret `mergesmith-secret`. Then, in another shell:
//!
//! ```sh
//! export AWS_ACCESS_KEY_ID=mergesmith AWS_SECRET_ACCESS_KEY=mergesmith-secret \
//!        AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
//! mergesmith build recipe.yaml --remote s3://mergesmith/team
//! ```

#[path = "../tests/it/common/s3.rs"]
mod s3;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: s3_server DIR [PORT]");
        std::process::exit(2);
    };
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(9000);
    let server = s3::S3Server::start_on(
        std::path::Path::new(&dir),
        "mergesmith",
        "mergesmith",
        "mergesmith-secret",
        port,
    );
    println!("serving {dir} at {}", server.endpoint);
    loop {
        std::thread::park();
    }
}
