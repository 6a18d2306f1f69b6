//! [`EngineHandle`]: an [`Engine`] on its own thread, driven over channels, for servers and other
//! callers that must never block the decode loop or be blocked by it.
//!
//! The thread owns the model and the context; it takes commands between steps and sends each
//! request's [`Event`]s to that request's own [`EventStream`]. When a request's stream is dropped
//! (a client went away), the request is cancelled before the next step, queued, prefilling or
//! decoding, and its KV cells are freed at once; so does [`EngineHandle::cancel`]. Dropping the
//! handle stops the thread (running requests are dropped) and waits for it, unless its step hangs.
//!
//! Async callers (an HTTP server) give each request their own [`EventSink`] instead
//! ([`EngineHandle::submit_to`]): the engine thread hands it each event, which must not block (e.g.
//! a send on an unbounded async channel), and asks it before every step whether anyone still
//! listens. [`EngineHandle::with_model`] runs a closure with the model on the engine thread
//! (tokenizing, chat templates), since the model is not shared across threads.
//!
//! A panic on the engine thread (a bug) is caught: every request in flight fails with
//! [`EngineError::Panicked`], the thread ends, and [`EngineHandle::failure`] says why from then on,
//! so a server reports it (`/health` 503) and exits for its supervisor to restart it; the engine's
//! state after a panic is not trusted, so it is not resumed.
//!
//! The thread also says when its current step started ([`EngineHandle::step_running_for`]), so
//! a caller can tell a step that never ends (a hung RPC worker: ggml's RPC client has no timeout)
//! from a busy engine.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use iapt_llama::{Model, ModelParams};

use crate::engine::{Engine, EngineConfig, EngineStats};
use crate::error::EngineError;
use crate::registry::{AdapterInfo, InsertOptions, Inserted, Prep, Resident, Unloaded};
use crate::request::{Event, EventKind, Request, SeqId};
use iapt_format::Adapter;

/// What the engine thread starts with.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// The base model (GGUF).
    pub model: PathBuf,
    /// Where its layers go.
    pub model_params: ModelParams,
    /// Engine settings.
    pub config: EngineConfig,
    /// Adapters loaded before the engine is ready, pinned: `(name, file)`.
    pub adapters: Vec<(String, PathBuf)>,
}

/// A snapshot of the engine's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Counters since start.
    pub stats: EngineStats,
    /// Requests in a slot.
    pub running: usize,
    /// Requests waiting.
    pub queued: usize,
    /// KV cells held by running requests.
    pub cells_in_use: usize,
}

type Reply<T> = Sender<Result<T, EngineError>>;

/// Where one request's events go, on the engine thread ([`EngineHandle::submit_to`]).
pub trait EventSink: Send {
    /// Delivers one event, in order. Must return at once (never wait on a client); `false` says
    /// nobody listens any more, and the request is cancelled (its KV cells freed).
    fn send(&mut self, event: Event) -> bool;

    /// Whether anyone still listens, asked before every step: `false` cancels the request before
    /// it takes part in another step (queued, prefilling or decoding).
    fn is_alive(&self) -> bool {
        true
    }
}

/// The engine thread's end of an [`EventStream`].
struct StreamSink {
    tx: Sender<Event>,
    /// Gone once the [`EventStream`] is dropped.
    alive: Weak<()>,
}

impl EventSink for StreamSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send(event).is_ok()
    }

    fn is_alive(&self) -> bool {
        self.alive.strong_count() > 0
    }
}

type Sink = Box<dyn EventSink>;

/// The sinks of the requests in flight. A request of n choices ([`Request::n`]) has one sink for
/// all of them: kept until every choice has ended, and when it stops listening every choice is
/// cancelled.
#[derive(Default)]
struct Sinks {
    /// By the request's first id: its sink and its choices not yet ended.
    by_first: HashMap<SeqId, (Sink, Vec<SeqId>)>,
    /// Each open choice's first id.
    first_of: HashMap<SeqId, SeqId>,
}

impl Sinks {
    fn insert(&mut self, first: SeqId, n: usize, sink: Sink) {
        let ids: Vec<SeqId> = (0..n as u64).map(|i| SeqId(first.0 + i)).collect();
        for &id in &ids {
            self.first_of.insert(id, first);
        }
        self.by_first.insert(first, (sink, ids));
    }

    /// Removes the request `first` and returns its open choices (to cancel them).
    fn remove(&mut self, first: SeqId) -> Vec<SeqId> {
        let open = self.by_first.remove(&first).map(|(_, ids)| ids).unwrap_or_default();
        for id in &open {
            self.first_of.remove(id);
        }
        open
    }

    /// Delivers `ev`; `false` when nobody listens (the caller cancels the request's choices).
    fn send(&mut self, ev: Event) -> bool {
        let Some(&first) = self.first_of.get(&ev.id) else { return false };
        let (id, last) = (ev.id, !matches!(ev.kind, EventKind::Token(_)));
        let Some((sink, open)) = self.by_first.get_mut(&first) else { return false };
        let delivered = sink.send(ev);
        if last {
            open.retain(|&o| o != id);
            self.first_of.remove(&id);
            if open.is_empty() {
                self.by_first.remove(&first);
            }
        }
        delivered
    }

    /// The open choices of requests whose sink stopped listening (removed here).
    fn dead(&mut self) -> Vec<SeqId> {
        let gone: Vec<SeqId> = self.by_first.iter().filter(|(_, (sink, _))| !sink.is_alive()).map(|(&f, _)| f).collect();
        gone.into_iter().flat_map(|f| self.remove(f)).collect()
    }
}

/// A closure run with the model on the engine thread ([`EngineHandle::with_model`]).
type ModelJob = Box<dyn FnOnce(&Model) + Send>;

/// The events of one request, in order, ending with [`EventKind::Done`] or [`EventKind::Failed`]
/// (after which the stream is closed). Dropping it cancels the request.
#[derive(Debug)]
pub struct EventStream {
    rx: Receiver<Event>,
    _alive: Arc<()>,
}

impl EventStream {
    /// Waits for the next event; `None` once the request has ended (or the engine stopped).
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }

    /// The next event if there is one now; `Ok(None)` when none is ready; `Err(())` once the
    /// stream is closed.
    #[allow(clippy::result_unit_err)]
    pub fn try_recv(&self) -> Result<Option<Event>, ()> {
        match self.rx.try_recv() {
            Ok(e) => Ok(Some(e)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(()),
        }
    }

    /// Waits up to `timeout`; `Ok(None)` on timeout, `Err(())` once the stream is closed.
    #[allow(clippy::result_unit_err)]
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Event>, ()> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Ok(Some(e)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(()),
        }
    }
}

impl Iterator for EventStream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

enum Command {
    Submit(Box<Request>, Sink, Reply<SeqId>),
    WithModel(ModelJob),
    Cancel(SeqId),
    Insert(String, Box<Resident>, InsertOptions, Reply<Inserted>),
    Pin(String, bool, Reply<AdapterInfo>),
    Unload(String, Reply<Unloaded>),
    List(Sender<Vec<AdapterInfo>>),
    Status(Sender<Status>),
}

/// An [`Engine`] running on its own thread (see the module documentation). Cloneable handles are
/// not offered; share it behind an `Arc` (every method takes `&self`).
pub struct EngineHandle {
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// Why the engine thread stopped on its own (a panic), once it has.
    failure: Arc<Mutex<Option<String>>>,
    /// What preparing an adapter takes: done on the caller's thread, never the engine's.
    prep: Arc<Prep>,
    /// When the engine thread's current step started (see [`StepClock`]).
    clock: Arc<StepClock>,
}

/// When the engine thread's current step started: milliseconds after `origin`, plus one (0: no
/// step running).
struct StepClock {
    origin: Instant,
    started: AtomicU64,
}

impl StepClock {
    fn start(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.started.store(ms, Ordering::Release);
    }

    fn stop(&self) {
        self.started.store(0, Ordering::Release);
    }

    fn running_for(&self) -> Option<Duration> {
        match self.started.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.origin.elapsed().saturating_sub(Duration::from_millis(ms - 1))),
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread: loads the model and the adapters, then waits for commands.
    /// Returns once the engine is ready, or with the error that stopped it.
    pub fn spawn(spec: EngineSpec) -> Result<EngineHandle, EngineError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let failure = Arc::new(Mutex::new(None));
        let fail_slot = failure.clone();
        let clock = Arc::new(StepClock { origin: Instant::now(), started: AtomicU64::new(0) });
        let thread_clock = clock.clone();
        let thread = std::thread::Builder::new()
            .name("iapt-engine".to_owned())
            .spawn(move || run(spec, rx, ready_tx, fail_slot, thread_clock))
            .map_err(|e| EngineError::Config { detail: format!("cannot start the engine thread: {e}") })?;
        match ready_rx.recv() {
            Ok(Ok(prep)) => Ok(EngineHandle { tx: Some(tx), thread: Some(thread), failure, prep, clock }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Stopped)
            }
        }
    }

    /// Why the engine thread stopped on its own (it panicked), or `None` while it runs. Once set,
    /// every call fails with [`EngineError::Stopped`].
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long the engine thread has been in its current step (`None` between steps). A step
    /// takes what one decode takes; one that never ends is a hung backend (an RPC worker).
    pub fn step_running_for(&self) -> Option<Duration> {
        self.clock.running_for()
    }

    fn send(&self, c: Command) -> Result<(), EngineError> {
        self.tx.as_ref().ok_or(EngineError::Stopped)?.send(c).map_err(|_| EngineError::Stopped)
    }

    fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.send(make(tx))?;
        rx.recv().map_err(|_| EngineError::Stopped)?
    }

    /// Validates and queues `req` (answered between two steps); its events arrive on the returned
    /// stream. Dropping the stream cancels the request.
    pub fn submit(&self, req: Request) -> Result<(SeqId, EventStream), EngineError> {
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(());
        let sink = StreamSink { tx, alive: Arc::downgrade(&alive) };
        let id = self.submit_to(req, Box::new(sink))?;
        Ok((id, EventStream { rx, _alive: alive }))
    }

    /// Validates and queues `req` (answered between two steps); its events go to `sink` (see
    /// [`EventSink`]), and the request is cancelled once the sink stops listening.
    pub fn submit_to(&self, req: Request, sink: Box<dyn EventSink>) -> Result<SeqId, EngineError> {
        self.ask(|reply| Command::Submit(Box::new(req), sink, reply))
    }

    /// Runs `f` with the base model on the engine thread, between two steps, and returns its result.
    pub fn with_model<T: Send + 'static>(&self, f: impl FnOnce(&Model) -> T + Send + 'static) -> Result<T, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::WithModel(Box::new(move |m| {
            let _ = tx.send(f(m));
        })))?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }

    /// Cancels a request, every choice of it (no effect when it has ended).
    pub fn cancel(&self, id: SeqId) -> Result<(), EngineError> {
        self.send(Command::Cancel(id))
    }

    /// Opens an adapter file and loads it as `name` (see [`EngineHandle::load_adapter_parsed`]).
    pub fn load_adapter(&self, name: &str, path: PathBuf) -> Result<AdapterInfo, EngineError> {
        let adapter = Adapter::open(&path).map_err(|e| EngineError::AdapterFile { path: path.clone(), detail: e.to_string() })?;
        self.load_adapter_parsed(name, &adapter, InsertOptions::default()).map(|i| i.info)
    }

    /// Loads a parsed adapter as `name`: checked against the base model and its generator built on
    /// the calling thread (never the engine's: a large adapter never stalls decoding), then made
    /// resident between two steps, evicting what the engine's [`crate::AdapterCache`] requires.
    pub fn load_adapter_parsed(&self, name: &str, adapter: &Adapter, opts: InsertOptions) -> Result<Inserted, EngineError> {
        let resident = self.prep.prepare(name, adapter)?;
        let inserted = self.ask(|reply| Command::Insert(name.to_owned(), Box::new(resident), opts, reply))?;
        crate::registry::release_evicted(&inserted);
        Ok(inserted)
    }

    /// Pins `name` (never evicted) or unpins it.
    pub fn pin_adapter(&self, name: &str, pinned: bool) -> Result<AdapterInfo, EngineError> {
        self.ask(|reply| Command::Pin(name.to_owned(), pinned, reply))
    }

    /// Unloads `name` (deferred while in use).
    pub fn unload_adapter(&self, name: &str) -> Result<Unloaded, EngineError> {
        self.ask(|reply| Command::Unload(name.to_owned(), reply))
    }

    /// The resident adapters.
    pub fn adapters(&self) -> Result<Vec<AdapterInfo>, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::List(tx))?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }

    /// The engine's counters and occupancy.
    pub fn status(&self) -> Result<Status, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Status(tx))?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }
}

impl Drop for EngineHandle {
    /// Closes the command channel; the thread ends at its next step boundary. It is waited for
    /// unless a step is running that has been running for a while (a hung backend would make the
    /// wait endless; the thread then ends with the process).
    fn drop(&mut self) {
        self.tx.take();
        let hung = self.clock.running_for().is_some_and(|t| t > Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            if !hung {
                let _ = t.join();
            }
        }
    }
}

/// The text of a panic's payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The engine thread's body.
fn run(
    spec: EngineSpec,
    rx: Receiver<Command>,
    ready: Sender<Result<Arc<Prep>, EngineError>>,
    failure: Arc<Mutex<Option<String>>>,
    clock: Arc<StepClock>,
) {
    let model = match Model::load_with(&spec.model, &spec.model_params) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let mut engine = match Engine::new(&model, spec.config) {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // The adapters named at start are the server's fixed set: pinned, never evicted.
    for (name, path) in &spec.adapters {
        let loaded = Adapter::open(path)
            .map_err(|e| EngineError::AdapterFile { path: path.clone(), detail: e.to_string() })
            .and_then(|a| engine.load_adapter_with(name, &a, InsertOptions { pinned: true, replace: false }));
        if let Err(e) = loaded {
            let _ = ready.send(Err(e));
            return;
        }
    }
    if ready.send(Ok(engine.adapter_prep())).is_err() {
        return;
    }
    let mut sinks = Sinks::default();
    loop {
        // Idle: sleep until a command comes. Busy: take what is there and step.
        if engine.is_idle() {
            match rx.recv() {
                Ok(c) => command(&mut engine, &mut sinks, c),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => command(&mut engine, &mut sinks, c),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        // Requests whose stream was dropped: cancelled before they take part in another step.
        for id in sinks.dead() {
            engine.cancel(id);
        }
        clock.start();
        let stepped = catch_unwind(AssertUnwindSafe(|| engine.step()));
        clock.stop();
        let events = match stepped {
            Ok(events) => events,
            Err(p) => {
                // A bug: fail every request in flight, say why, and stop (the state is not trusted).
                let why = format!("the engine panicked: {}", panic_text(p.as_ref()));
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                for (_, (mut sink, open)) in sinks.by_first.drain() {
                    for id in open {
                        sink.send(Event { id, kind: EventKind::Failed(EngineError::Panicked { detail: why.clone() }) });
                    }
                }
                return;
            }
        };
        for ev in events {
            let id = ev.id;
            if !sinks.send(ev) {
                // The receiver is gone: the client does not want the rest of any choice.
                if let Some(&first) = sinks.first_of.get(&id) {
                    for open in sinks.remove(first) {
                        engine.cancel(open);
                    }
                }
            }
        }
    }
}

fn command(engine: &mut Engine<'_>, sinks: &mut Sinks, c: Command) {
    match c {
        Command::Submit(req, events, reply) => {
            let n = req.n;
            let r = engine.submit(*req);
            if let Ok(id) = r {
                sinks.insert(id, n, events);
            }
            if let Err(Ok(id)) = reply.send(r).map_err(|e| e.0) {
                // The caller gave up waiting: nobody will read the events.
                for open in sinks.remove(id) {
                    engine.cancel(open);
                }
            }
        }
        Command::WithModel(job) => job(engine.model()),
        Command::Cancel(id) => {
            // The whole request, whichever of its choices is named.
            let first = sinks.first_of.get(&id).copied().unwrap_or(id);
            engine.cancel(id);
            for open in sinks.remove(first) {
                engine.cancel(open);
            }
        }
        Command::Insert(name, resident, opts, reply) => {
            let _ = reply.send(engine.insert_adapter(&name, *resident, opts));
        }
        Command::Pin(name, pinned, reply) => {
            let _ = reply.send(engine.pin_adapter(&name, pinned));
        }
        Command::Unload(name, reply) => {
            let _ = reply.send(engine.unload_adapter(&name));
        }
        Command::List(reply) => {
            let _ = reply.send(engine.adapters());
        }
        Command::Status(reply) => {
            let _ = reply.send(Status {
                stats: engine.stats().clone(),
                running: engine.running(),
                queued: engine.queued(),
                cells_in_use: engine.cells_in_use(),
            });
        }
    }
}
