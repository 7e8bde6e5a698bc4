//! Progress reporting: bars on a terminal, nothing when piped or in `--json` mode.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Every bar of the process, so bars of nodes built at the same time (`--jobs`) stack
/// instead of overwriting each other.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// A byte-count progress bar drawn on stderr when it is a terminal and `enabled` is true;
/// otherwise a hidden bar whose updates cost nothing.
pub fn bytes(total: u64, message: &str, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = bars().add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A counting progress bar (items), drawn like [`bytes`]'s.
pub fn count(total: u64, message: &str, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = bars().add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Set when the running build should stop: `watch` asks once an edit made it pointless.
static CANCEL: AtomicBool = AtomicBool::new(false);

/// Asks the running build to stop at its next check (between nodes, tensors of a merge and
/// sampling steps). What it was writing is dropped (temp files), nothing half-written stays.
pub fn request_cancel() {
    CANCEL.store(true, Ordering::SeqCst);
}

/// Clears a request, before the next build.
pub fn clear_cancel() {
    CANCEL.store(false, Ordering::SeqCst);
}

/// `Err(Error::Cancelled)` once a stop was requested.
pub fn check_cancel() -> crate::error::Result<()> {
    match CANCEL.load(Ordering::Relaxed) {
        true => Err(crate::error::Error::Cancelled),
        false => Ok(()),
    }
}
