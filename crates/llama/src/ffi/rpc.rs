//! ggml's RPC backend (compiled in: `GGML_RPC=ON` in `.cargo/config.toml`): a worker that serves
//! this machine's devices ([`rpc_worker_serve`], what `iapt rpc-server` runs, as llama.cpp's own
//! `rpc-server` does), and the client side that adds workers to ggml's device registry
//! ([`add_rpc_workers`]), after which a model loaded with every layer offloaded puts its layers on
//! them. The IAPT hook then reads and writes the residual rows that live in RPC buffers through
//! `ggml_backend_tensor_get/set` (one round trip each), while the generators run in the client.
//!
//! ggml-rpc.h is not in llama-cpp-sys-2's bindings, so its four functions are declared here from
//! the header of the pinned llama.cpp (signatures checked against
//! `ggml/include/ggml-rpc.h` of llama-cpp-sys-2 0.1.161).
//!
//! The RPC protocol has no authentication: a worker must only ever listen on a trusted network
//! (the CLI binds the loopback unless told otherwise, and warns).
//!
//! A worker that dies mid-run makes ggml abort the client (`GGML_ABORT`, no error path exists in
//! ggml's RPC client); [`install_abort_exit`] turns that abort into a clear message and exit code 1
//! for a command-line process.

use std::collections::HashSet;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::sync::Mutex;

use super::{init, sys};
use crate::error::LlamaError;

extern "C" {
    fn ggml_backend_rpc_start_server(
        endpoint: *const c_char,
        cache_dir: *const c_char,
        n_threads: usize,
        n_devices: usize,
        devices: *mut sys::ggml_backend_dev_t,
    );
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
}

/// A worker's address, `HOST:PORT` (checked: a non-empty host without spaces, a port 1-65535).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RpcEndpoint(String);

impl RpcEndpoint {
    /// Parses `HOST:PORT`.
    pub fn parse(s: &str) -> Result<RpcEndpoint, LlamaError> {
        let bad = |why: &str| LlamaError::RpcEndpoint { endpoint: s.to_owned(), why: why.to_owned() };
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("expected HOST:PORT"))?;
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '\0') {
            return Err(bad("the host is empty or contains spaces"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(RpcEndpoint(s.to_owned())),
            _ => Err(bad("the port must be a number from 1 to 65535")),
        }
    }

    /// Parses a comma-separated list `HOST:PORT[,HOST:PORT...]` (at least one).
    pub fn parse_list(s: &str) -> Result<Vec<RpcEndpoint>, LlamaError> {
        s.split(',').map(|e| RpcEndpoint::parse(e.trim())).collect()
    }

    /// The endpoint as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the host is a loopback address (`127.*`, `::1`, `localhost`).
    pub fn is_loopback(&self) -> bool {
        let host = self.0.rsplit_once(':').map_or("", |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn c(&self) -> CString {
        CString::new(self.0.as_str()).unwrap_or_else(|_| unreachable!("`parse` refuses NUL bytes"))
    }
}

impl std::fmt::Display for RpcEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Endpoints already registered in this process (ggml's registry must not get a worker twice).
static ADDED: Mutex<Option<HashSet<RpcEndpoint>>> = Mutex::new(None);

/// Connects to each worker and adds its devices to ggml's registry (as llama.cpp's `--rpc` does),
/// so that models loaded afterwards with layers offloaded ([`super::ModelParams`]) place them on
/// the workers. Adding the same endpoint again does nothing. Fails with
/// [`LlamaError::RpcUnreachable`] when a worker cannot be reached (checked with a TCP connection
/// first, since ggml's RPC client aborts the process on a failed connect) or reports no device.
/// Something at the address that is not an RPC worker fails ggml's handshake, which aborts: see
/// [`install_abort_exit`].
pub fn add_rpc_workers(endpoints: &[RpcEndpoint]) -> Result<(), LlamaError> {
    init();
    let mut added = ADDED.lock().unwrap_or_else(|e| e.into_inner());
    let added = added.get_or_insert_with(HashSet::new);
    for e in endpoints {
        if added.contains(e) {
            continue;
        }
        // ggml's RPC client aborts the process when it cannot connect: find out first.
        probe(e)?;
        let c = e.c();
        // SAFETY: `c` is a NUL-terminated string alive for the call; the function connects to
        // the endpoint, asks for its device count and returns a registry entry it owns (cached
        // per endpoint for the whole process), or null when the worker is unreachable.
        let reg = unsafe { ggml_backend_rpc_add_server(c.as_ptr()) };
        if reg.is_null() {
            return Err(LlamaError::RpcUnreachable { endpoint: e.to_string() });
        }
        // SAFETY: `reg` is a non-null registry entry from ggml-rpc that lives for the whole
        // process; it is registered once (guarded by `ADDED`), as ggml's registry requires.
        unsafe { sys::ggml_backend_register(reg) };
        added.insert(e.clone());
    }
    Ok(())
}

/// How long [`probe`] waits for a worker to accept a connection.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks that something accepts TCP connections at `e` (the worker serves one client at a time
/// and returns to accepting when this connection closes).
fn probe(e: &RpcEndpoint) -> Result<(), LlamaError> {
    use std::net::{TcpStream, ToSocketAddrs};
    let unreachable = || LlamaError::RpcUnreachable { endpoint: e.to_string() };
    let addrs: Vec<_> = e.as_str().to_socket_addrs().map_err(|_| unreachable())?.collect();
    match addrs.iter().find_map(|a| TcpStream::connect_timeout(a, PROBE_TIMEOUT).ok()) {
        Some(_) => Ok(()),
        None => Err(unreachable()),
    }
}

/// Serves this machine's devices to RPC clients at `endpoint` (every GPU device, or the CPU when
/// there is none), with `n_threads` CPU threads and an optional tensor cache folder. Blocks for as
/// long as the worker runs (one client at a time); returns only when the worker could not start
/// (the port is taken, the address is invalid): [`LlamaError::RpcServe`].
pub fn rpc_worker_serve(endpoint: &RpcEndpoint, cache_dir: Option<&Path>, n_threads: usize) -> Result<(), LlamaError> {
    init();
    let mut devices = serving_devices();
    if devices.is_empty() {
        return Err(LlamaError::RpcServe { endpoint: endpoint.to_string(), why: "ggml reports no device to serve".to_owned() });
    }
    let cache = match cache_dir {
        Some(p) => Some(super::path_cstring(p)?),
        None => None,
    };
    let c = endpoint.c();
    // SAFETY: `c` and `cache` (or null) are NUL-terminated strings alive for the whole call; the
    // device handles come from ggml's registry (valid for the whole process) and `devices` holds
    // exactly `devices.len()` of them. The call blocks while it serves and returns only on a setup
    // failure, after printing the reason to stderr.
    unsafe {
        ggml_backend_rpc_start_server(
            c.as_ptr(),
            cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            n_threads.max(1),
            devices.len(),
            devices.as_mut_ptr(),
        );
    }
    Err(LlamaError::RpcServe {
        endpoint: endpoint.to_string(),
        why: "the worker stopped (see the message above: the port may be in use or the address invalid)".to_owned(),
    })
}

/// The local devices a worker serves: every GPU, else the CPU.
fn serving_devices() -> Vec<sys::ggml_backend_dev_t> {
    let pick = |ty| -> Vec<sys::ggml_backend_dev_t> {
        // SAFETY: no arguments / an index below `ggml_backend_dev_count()`; the registry is a
        // process-wide static and its device handles live for the whole process.
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n)
            .map(|i| unsafe { sys::ggml_backend_dev_get(i) })
            // SAFETY: `d` is a non-null device handle from the registry.
            .filter(|&d| !d.is_null() && unsafe { sys::ggml_backend_dev_type(d) } == ty)
            .collect()
    };
    let gpus = pick(sys::GGML_BACKEND_DEVICE_TYPE_GPU);
    if gpus.is_empty() {
        pick(sys::GGML_BACKEND_DEVICE_TYPE_CPU)
    } else {
        gpus
    }
}

/// ggml's abort callback: print ggml's message with a hint, then end the process with exit code 1.
extern "C" fn abort_exit(message: *const c_char) {
    let msg = if message.is_null() {
        String::new()
    } else {
        // SAFETY: ggml passes a NUL-terminated message valid for the duration of the call.
        unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
    };
    eprintln!("error: llama.cpp stopped: {}", msg.trim());
    if msg.contains("RPC") {
        eprintln!("hint: an RPC worker stopped or the connection to it broke; restart `iapt rpc-server` and run again");
    }
    std::process::exit(1);
}

/// Makes a `GGML_ABORT` inside llama.cpp (e.g. an RPC worker that died mid-run) end the process
/// with a clear message and exit code 1 instead of `SIGABRT`. For command-line processes: a
/// library embedding llama.cpp in a long-lived host should not call it.
pub fn install_abort_exit() {
    init();
    // SAFETY: `abort_exit` is a valid `extern "C"` function for the whole program that never
    // unwinds (it exits); replacing ggml's process-wide abort callback has no other precondition.
    unsafe {
        sys::ggml_set_abort_callback(Some(abort_exit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(RpcEndpoint::parse("127.0.0.1:50052").unwrap().is_loopback());
        assert!(RpcEndpoint::parse("localhost:1").unwrap().is_loopback());
        assert!(RpcEndpoint::parse("[::1]:9").unwrap().is_loopback());
        assert!(!RpcEndpoint::parse("10.0.0.7:50052").unwrap().is_loopback());
        for bad in ["", "host", ":50052", "host:", "host:0", "host:70000", "ho st:1", "a:b"] {
            assert!(matches!(RpcEndpoint::parse(bad), Err(LlamaError::RpcEndpoint { .. })), "{bad:?}");
        }
        assert_eq!(RpcEndpoint::parse_list("127.0.0.1:1, 127.0.0.1:2").unwrap().len(), 2);
        assert!(RpcEndpoint::parse_list("127.0.0.1:1,").is_err());
    }

    #[test]
    fn an_unreachable_worker_is_an_error_not_an_abort() {
        // A port nobody listens on: bind one, then close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = RpcEndpoint::parse(&format!("127.0.0.1:{port}")).unwrap();
        assert!(matches!(add_rpc_workers(&[e]), Err(LlamaError::RpcUnreachable { .. })));
    }
}
