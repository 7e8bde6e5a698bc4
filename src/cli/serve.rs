//! `mergesmith serve`: `watch`, plus the recipe's HTML report (the same static site as
//! `report`) served on localhost. Pages get a small script that shows what is building and
//! the last error, and reloads them when a build finishes. Plain HTTP/1.1 over the standard
//! library: GET of files under the site folder, and two paths of its own
//! (`/__mergesmith/status`, `/__mergesmith/live.js`).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Args;
use mergesmith::build::watch::Event;
use mergesmith::error::{Error, Result};

use super::recipe_cache;
use super::watch::{print, WatchArgs};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The loop (recipe, cache, device, --with-saves...).
    #[command(flatten)]
    pub watch: WatchArgs,
    /// Address to listen on (port 0: any free port; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:8765", value_name = "HOST:PORT")]
    pub addr: String,
    /// The folder the site is written to (created; pages are replaced, images kept).
    #[arg(long, short = 'o', default_value = "site", value_name = "DIR")]
    pub out: PathBuf,
}

/// What pages are told (`/__mergesmith/status`).
#[derive(Debug, Default, Clone, serde::Serialize)]
struct State {
    /// Finished builds; a page reloads when it changes.
    generation: u64,
    /// The build running now and the nodes it runs.
    building: Option<(u64, Vec<String>)>,
    /// The last error (a recipe that does not read, failed nodes), cleared by a good build.
    last_error: Option<String>,
    /// HTML pages served (how a test sees a browser reload).
    page_loads: u64,
}

/// The script every served page gets: polls the status, shows it, reloads on a new build.
const LIVE_JS: &str = r##"(function () {
  var me = document.currentScript, seen = Number(new URL(me.src).searchParams.get("gen"));
  var box = document.createElement("div");
  box.style.cssText = "position:fixed;right:12px;bottom:12px;padding:6px 10px;border-radius:6px;" +
    "font:13px system-ui,sans-serif;max-width:40em;white-space:pre-wrap;z-index:99;" +
    "box-shadow:0 1px 4px rgba(0,0,0,.25)";
  document.body.appendChild(box);
  function show(text, color) { box.textContent = text; box.style.background = color; }
  function tick() {
    fetch("/__mergesmith/status", { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(function (s) {
        if (s.generation !== seen) { location.reload(); return; }
        if (s.building) show("building " + s.building[0] + ": " + (s.building[1].join(", ") || "checking"), "#fff4c2");
        else if (s.last_error) show("error: " + s.last_error, "#ffd6d6");
        else show("up to date (build " + s.generation + ")", "#d9f5d9");
        setTimeout(tick, 500);
      })
      .catch(function () { show("mergesmith serve is not running", "#ddd"); setTimeout(tick, 2000); });
  }
  tick();
})();
"##;

/// The page shown before the first build has written the site.
const WAITING: &str =
    "<!doctype html><html><head><meta charset=\"utf-8\"><title>mergesmith</title>\
</head><body><p>The first build is running; this page reloads when it is done.</p></body></html>";

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// `%XX` decoded; `None` for malformed escapes or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The file under `root` a URL path names (`/` and folders: their index.html); `None` for
/// paths that leave the folder.
fn file_for(root: &Path, url: &str) -> Option<PathBuf> {
    let path = percent_decode(url.split(['?', '#']).next().unwrap_or(""))?;
    let mut out = root.to_path_buf();
    for c in Path::new(path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.is_dir() {
        out.push("index.html");
    }
    Some(out)
}

fn respond(mut s: &TcpStream, status: &str, kind: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
}

/// Answers one connection.
fn handle(stream: TcpStream, root: &Path, state: &Mutex<State>) {
    // A client that never finishes its request does not hold a thread for ever.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The rest of the head (headers) is read and ignored.
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, url) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    if method != "GET" && method != "HEAD" {
        return respond(
            &stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    match url.split('?').next().unwrap_or("") {
        "/__mergesmith/status" => {
            let s = state.lock().map(|s| s.clone()).unwrap_or_default();
            let body = serde_json::to_vec(&s).unwrap_or_default();
            return respond(&stream, "200 OK", "application/json", &body);
        }
        "/__mergesmith/live.js" => {
            return respond(&stream, "200 OK", "text/javascript", LIVE_JS.as_bytes());
        }
        _ => {}
    }
    let Some(path) = file_for(root, url) else {
        return respond(
            &stream,
            "403 Forbidden",
            "text/plain",
            b"outside the site\n",
        );
    };
    let html = path.extension().is_some_and(|e| e == "html");
    let body = match std::fs::read(&path) {
        Ok(b) => b,
        Err(_) if html && path.ends_with("index.html") && path.parent() == Some(root) => {
            WAITING.as_bytes().to_vec()
        }
        Err(_) => return respond(&stream, "404 Not Found", "text/plain", b"not found\n"),
    };
    if !html {
        return respond(&stream, "200 OK", content_type(&path), &body);
    }
    let generation = match state.lock() {
        Ok(mut s) => {
            s.page_loads += 1;
            s.generation
        }
        Err(_) => 0,
    };
    let tag = format!("<script src=\"/__mergesmith/live.js?gen={generation}\"></script>");
    let text = String::from_utf8_lossy(&body);
    let page = match text.rfind("</body>") {
        Some(i) => format!("{}{tag}{}", &text[..i], &text[i..]),
        None => format!("{text}{tag}"),
    };
    respond(&stream, "200 OK", content_type(&path), page.as_bytes());
}

/// Runs `serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    let w = &a.watch;
    let recipe = &w.common.recipe;
    let cache = recipe_cache(recipe, w.common.cache.as_deref(), None)?;
    let listener = TcpListener::bind(&a.addr)
        .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", a.addr)))?;
    let url = format!(
        "http://{}/",
        listener
            .local_addr()
            .map_err(|e| Error::Invalid(format!("{}: {e}", a.addr)))?
    );
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let root = std::fs::canonicalize(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let state = Arc::new(Mutex::new(State::default()));
    match w.json {
        true => println!("{}", serde_json::json!({ "event": "serving", "url": url })),
        false => println!("serving {url} (the report of {})", recipe.display()),
    }
    {
        let (root, state) = (root.clone(), state.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, state) = (root.clone(), state.clone());
                std::thread::spawn(move || handle(stream, &root, &state));
            }
        });
    }
    let json = w.json;
    // The state first, then the line: a client that reads "built" sees the new generation.
    let update = |e: &Event| {
        if let Ok(mut s) = state.lock() {
            record(&mut s, e);
        }
        print(e, json);
    };
    mergesmith::build::watch::watch(recipe, &cache, &w.options(), &update, &|recipe, reports| {
        mergesmith::report::write(recipe, &cache, reports, &root).map(|_| ())
    })
}

/// What an event changes in what the page is told.
fn record(s: &mut State, e: &Event) {
    match e {
        Event::Planned { number, runs } => {
            s.building = Some((*number, runs.iter().map(|(n, _)| n.clone()).collect()))
        }
        Event::Built { failures, .. } => {
            s.building = None;
            s.generation += 1;
            s.last_error = (!failures.is_empty()).then(|| failures.join("\n"));
        }
        Event::Cancelled { .. } => s.building = None,
        Event::Error { message } => {
            s.building = None;
            s.last_error = Some(message.clone());
        }
        Event::Changed { .. } => {}
    }
}
