//! Progress reporting: bars on a terminal, nothing when piped or in `--json` mode.

use std::cell::RefCell;
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

thread_local! {
    /// The node this thread builds, which its bars are labelled with.
    static NODE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Labels the bars this thread makes with the node `name` until the guard is dropped.
pub fn in_node(name: &str) -> NodeGuard {
    NODE.with(|n| *n.borrow_mut() = Some(name.to_string()));
    NodeGuard(())
}

/// Ends [`in_node`] when dropped.
pub struct NodeGuard(());

impl Drop for NodeGuard {
    fn drop(&mut self) {
        NODE.with(|n| *n.borrow_mut() = None);
    }
}

/// `message`, after the name of the node this thread builds (if any and not already there).
fn labelled(message: &str) -> String {
    NODE.with(|n| match n.borrow().as_deref() {
        Some(node) if !message.starts_with(node) => format!("{node} {message}"),
        _ => message.to_string(),
    })
}

/// A bar of `total` drawn on stderr with `template`, labelled `message`, when stderr is a
/// terminal and `enabled` is true; otherwise a hidden bar whose updates cost nothing.
fn bar(total: u64, template: &str, message: &str, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = bars().add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(labelled(message));
    bar
}

/// A byte-count progress bar drawn on stderr when it is a terminal and `enabled` is true;
/// otherwise a hidden bar whose updates cost nothing.
pub fn bytes(total: u64, message: &str, enabled: bool) -> ProgressBar {
    bar(
        total,
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        message,
        enabled,
    )
}

/// A bar over an output model's tensors: bytes written (for the rate and the ETA, which a
/// few huge tensors would make jumpy if counted by tensor) and tensors done.
pub struct TensorBar {
    bar: ProgressBar,
    done: std::sync::atomic::AtomicU64,
    tensors: u64,
}

impl TensorBar {
    /// Counts one finished tensor of `bytes` bytes. Safe to call from several threads.
    pub fn tensor_done(&self, bytes: u64) {
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.bar.is_hidden() {
            self.bar.set_prefix(format!("{n}/{}", self.tensors));
        }
        self.bar.inc(bytes);
    }

    /// Removes the bar.
    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }
}

/// A [`TensorBar`] for `tensors` tensors of `total` bytes, drawn like [`bytes`]'s.
pub fn tensors(total: u64, tensors: u64, message: &str, enabled: bool) -> TensorBar {
    let bar = bar(
        total,
        "{msg:>10} [{bar:40}] {prefix} tensors, {bytes}/{total_bytes} \
         {binary_bytes_per_sec} eta {eta}",
        message,
        enabled,
    );
    bar.set_prefix(format!("0/{tensors}"));
    TensorBar {
        bar,
        done: std::sync::atomic::AtomicU64::new(0),
        tensors,
    }
}

/// A counting progress bar (items), drawn like [`bytes`]'s.
pub fn count(total: u64, message: &str, enabled: bool) -> ProgressBar {
    bar(
        total,
        "{msg:>10} [{bar:40}] {pos}/{len} eta {eta}",
        message,
        enabled,
    )
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

/// The bar a thread's sampling steps are shown on: the bar, its label, the step count.
struct Steps {
    bar: ProgressBar,
    label: String,
    step: u64,
}

impl Steps {
    fn show(&self) {
        self.bar
            .set_message(format!("{}: step {}", self.label, self.step));
    }
}

thread_local! {
    static STEPS: RefCell<Option<Steps>> = const { RefCell::new(None) };
}

/// Shows this thread's sampling steps on `bar` (its message becomes `label: step N`) until
/// the guard is dropped.
pub fn show_steps(bar: &ProgressBar, label: &str) -> StepsGuard {
    STEPS.with(|s| {
        *s.borrow_mut() = Some(Steps {
            bar: bar.clone(),
            label: label.to_string(),
            step: 0,
        })
    });
    StepsGuard(())
}

/// Ends [`show_steps`] when dropped.
pub struct StepsGuard(());

impl StepsGuard {
    /// Counts from 0 again (the next image).
    pub fn restart(&self) {
        STEPS.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.step = 0;
                st.show();
            }
        });
    }
}

impl Drop for StepsGuard {
    fn drop(&mut self) {
        STEPS.with(|s| *s.borrow_mut() = None);
    }
}

/// One model evaluation of a sampler: `Err(Error::Cancelled)` once a stop was requested,
/// else the step count of this thread's bar ([`show_steps`]) moves on.
pub fn sampling_step() -> crate::error::Result<()> {
    check_cancel()?;
    STEPS.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            st.step += 1;
            st.show();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_carry_the_node_and_the_step() {
        assert_eq!(labelled("merge"), "merge");
        {
            let _n = in_node("blend");
            assert_eq!(labelled("merge"), "blend merge");
            assert_eq!(labelled("blend"), "blend");
        }
        assert_eq!(labelled("merge"), "merge");
        let bar = ProgressBar::hidden();
        {
            let steps = show_steps(&bar, "look");
            steps.restart();
            assert_eq!(bar.message(), "look: step 0");
            // No stop is requested by any test of this binary.
            sampling_step().unwrap();
            sampling_step().unwrap();
            assert_eq!(bar.message(), "look: step 2");
            steps.restart();
            assert_eq!(bar.message(), "look: step 0");
        }
        sampling_step().unwrap();
        assert_eq!(bar.message(), "look: step 0", "the guard ended the count");
    }
}
