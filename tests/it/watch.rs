//! The edit loop, end to end through the binary: `watch` rebuilds after edits of the recipe,
//! of an included file and of an input model, cancels a build a newer edit made pointless
//! (and then builds the right thing), shows a recipe error and keeps running; `serve`
//! answers the report and its images, and a page open in headless Chromium reloads after a
//! rebuild.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use mergesmith::arch::Family;
use serde_json::Value;

/// A running `watch` / `serve` and its JSON events.
struct Loop {
    child: Child,
    events: Receiver<Value>,
}

impl Loop {
    fn start(dir: &Path, args: &[&str]) -> Loop {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mergesmith"))
            .current_dir(dir)
            .args(args)
            .args(["--json", "--interval", "50"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Loop { child, events }
    }

    /// The next event of kind `event` (others before it are returned too, in order).
    fn until(&self, event: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{event}` event; saw {seen:?}"));
            let done = v["event"] == event;
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rewrites a file so its modification time surely moves (coarse filesystem clocks).
fn rewrite(path: &Path, text: &str) {
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(path, text).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    f.set_modified(later).unwrap();
}

const RECIPE: &str = "version: 1
include: [vars.yaml]
models:
  a: { path: a.safetensors }
  b: { path: b.safetensors }
nodes:
  blend: { merge: weight_sum, a: a, b: b, alpha: ALPHA }
  look:
    generate: { model: blend, prompt: a cat, steps: STEPS, width: 64, height: 48 }
    to: out
  file: { save: blend, to: blend.safetensors }
";

fn recipe(alpha: &str, steps: usize) -> String {
    RECIPE
        .replace("ALPHA", alpha)
        .replace("STEPS", &steps.to_string())
}

fn built(events: &[Value]) -> Vec<String> {
    let last = events.last().unwrap();
    assert_eq!(last["event"], "built", "{events:?}");
    let mut b: Vec<String> = last["built"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    b.sort();
    b
}

#[test]
fn watch_rebuilds_after_edits_cancels_stale_builds_and_survives_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::small_models(d, &["a", "b"]);
    let path = d.join("r.yaml");
    std::fs::write(d.join("vars.yaml"), "version: 1\nvars: { unused: 1 }\n").unwrap();
    std::fs::write(&path, recipe("0.3", 2)).unwrap();
    let w = Loop::start(d, &["watch", "r.yaml"]);
    // The first build: the merge and the preview, not the save.
    assert_eq!(built(&w.until("built")), ["blend", "look"]);
    assert!(d.join("out").is_dir() && !d.join("blend.safetensors").exists());

    // An edit of the recipe: planned with its reason, rebuilt.
    rewrite(&path, &recipe("0.4", 2));
    let ev = w.until("built");
    let planned = ev.iter().find(|e| e["event"] == "planned").unwrap();
    let why = planned["runs"].to_string();
    assert!(
        why.contains("alpha") && why.contains("0.3") && why.contains("0.4"),
        "{why}"
    );
    assert_eq!(built(&ev), ["blend", "look"]);

    // An edit of an included file that changes nothing built: a build with nothing to run.
    rewrite(&d.join("vars.yaml"), "version: 1\nvars: { unused: 2 }\n");
    let ev = w.until("built");
    assert!(ev
        .iter()
        .any(|e| e["event"] == "changed" && e["files"].to_string().contains("vars.yaml")));
    assert_eq!(built(&ev), Vec::<String>::new());

    // An edit of an input model: both nodes again.
    let mut o = crate::common::tiny(Family::builtin("sd1"), 9);
    o.size = mergesmith::synth::Size::Small;
    mergesmith::synth::synthesize(&o, &d.join("b.safetensors"), true, false).unwrap();
    let f = std::fs::File::options()
        .write(true)
        .open(d.join("b.safetensors"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(4))
        .unwrap();
    let ev = w.until("built");
    assert!(ev
        .iter()
        .any(|e| e["event"] == "changed" && e["files"].to_string().contains("b.safetensors")));
    assert_eq!(built(&ev), ["blend", "look"]);

    // A recipe error is shown, and the loop keeps going once it is fixed.
    rewrite(
        &path,
        &recipe("0.4", 2).replace("weight_sum", "weight_summ"),
    );
    let ev = w.until("error");
    assert!(ev.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("weight_summ"));

    // A slow build (many steps) cancelled by an edit made while it runs; the next build
    // makes what the file says now.
    rewrite(&path, &recipe("0.6", 400));
    w.until("planned");
    std::thread::sleep(Duration::from_millis(300));
    rewrite(&path, &recipe("0.7", 3));
    let ev = w.until("built");
    assert!(ev.iter().any(|e| e["event"] == "cancelled"), "{ev:?}");
    assert_eq!(built(&ev), ["blend", "look"]);
    drop(w);

    // What the loop left is what a clean build of the final recipe makes.
    let fresh = tempfile::tempdir().unwrap();
    let f = fresh.path();
    for m in ["a", "b"] {
        std::fs::copy(
            d.join(format!("{m}.safetensors")),
            f.join(format!("{m}.safetensors")),
        )
        .unwrap();
    }
    std::fs::copy(d.join("vars.yaml"), f.join("vars.yaml")).unwrap();
    std::fs::write(f.join("r.yaml"), recipe("0.7", 3)).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .current_dir(f)
        .args(["build", "r.yaml", "look", "--json"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let pngs = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.join("out"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert!(
        pngs(d) == pngs(f),
        "the watched preview differs from a clean build's"
    );
}

/// GET `path` from `base` (`http://HOST:PORT/`): status code and body.
fn get(base: &str, path: &str) -> (u32, Vec<u8>) {
    let host = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut s = std::net::TcpStream::connect(&host).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).to_string();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, all[split + 4..].to_vec())
}

fn status(base: &str) -> Value {
    serde_json::from_slice(&get(base, "/__mergesmith/status").1).unwrap()
}

#[test]
fn serve_answers_the_report_and_a_browser_reloads_after_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::small_models(d, &["a", "b"]);
    std::fs::write(d.join("vars.yaml"), "version: 1\n").unwrap();
    let path = d.join("r.yaml");
    std::fs::write(&path, recipe("0.3", 2)).unwrap();
    let s = Loop::start(
        d,
        &["serve", "r.yaml", "--addr", "127.0.0.1:0", "-o", "site"],
    );
    let url = s.until("serving").last().unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    s.until("built");
    // The index, with the live script; an image of it; nothing outside the site.
    let (code, index) = get(&url, "/");
    assert_eq!(code, 200);
    let index = String::from_utf8(index).unwrap();
    assert!(index.contains("/__mergesmith/live.js?gen=1"), "{index}");
    let img = index
        .split("src=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .find(|s| s.ends_with(".png"))
        .unwrap_or_else(|| panic!("no image in {index}"));
    let (code, png) = get(&url, &format!("/{}", img.replace("&#x2f;", "/")));
    assert_eq!(code, 200);
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(get(&url, "/../r.yaml").0, 403);
    assert_eq!(get(&url, "/__mergesmith/live.js").0, 200);
    assert_eq!(status(&url)["generation"], 1);

    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    else {
        eprintln!("skipping the browser check: no chromium found");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let mut chrome = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait_loads = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while status(&url)["page_loads"].as_u64().unwrap() < n {
            assert!(
                Instant::now() < deadline,
                "the page was loaded fewer than {n} times"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Our own GET of the index counted once; the browser's makes two.
    wait_loads(2);
    // Let the page's script start polling, then rebuild: the page reloads itself.
    std::thread::sleep(Duration::from_secs(1));
    rewrite(&path, &recipe("0.5", 2));
    s.until("built");
    wait_loads(3);
    let _ = chrome.kill();
    let _ = chrome.wait();
}
