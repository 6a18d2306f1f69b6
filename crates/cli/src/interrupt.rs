//! SIGINT and SIGTERM: the temporary files of atomic writes in flight are removed, then the
//! program exits with 128 + the signal number (130, 143), as a shell reports a process killed by
//! it. Outputs that already existed stay untouched (a temporary is renamed over them only when
//! complete). What `kill -9` leaves behind is removed by the next write to the same directory
//! (`iapt_format::temp::remove_stale`).

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Installs the handler (a thread that waits for the signals); a failure to install is reported
/// and otherwise ignored (the signals then act as they did before).
pub fn install() {
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: cannot handle SIGINT/SIGTERM ({e}); an interrupted write may leave a .iapt-tmp-* file");
            return;
        }
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let removed = iapt_format::temp::remove_in_flight();
            if removed > 0 {
                eprintln!("interrupted: removed {removed} unfinished temporary file(s); existing outputs are untouched");
            }
            std::process::exit(128 + sig);
        }
    });
}
