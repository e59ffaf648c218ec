//! The bounded admission queue behind `spawn_overflow: queue`.
//!
//! Why: with `spawn_overflow: queue`, a spawn that is over a queueable limit
//! (the global or the per-owner `max_sandboxes`) does not answer 429 at once;
//! it waits until a sandbox goes away and is then admitted. Waiting must stay
//! cheap and fair, so the queue is
//!
//! - **bounded**: at most `max_waiters` spawns wait; one more is refused with
//!   [`QueueError::Full`] at once;
//! - **time-limited**: a spawn waits at most `max_wait`, then gets
//!   [`QueueError::Timeout`];
//! - **FIFO-fair**: every waiter holds a ticket. When capacity is freed a
//!   *round* runs: waiters re-check admission one at a time in ticket order,
//!   so earlier waiters get the first chance and a newcomer, which joins at
//!   the tail, cannot overtake them. A waiter that still cannot go (say its
//!   owner is at its own cap) passes the turn on, so it blocks nobody;
//! - **cancellation-safe**: a waiter whose future is dropped (the client went
//!   away) leaves the queue, passing the turn on if it held it.
//!
//! The queue knows nothing about sandboxes: the caller passes a closure that
//! re-runs admission (and, when admitted, does whatever must happen under the
//! admission lock) and calls [`SpawnQueue::notify_capacity_freed`] whenever a
//! sandbox stops counting against a limit. A round also runs every poll
//! interval (500 ms by default) while spawns wait, as a safety net for
//! capacity freed without a notification.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

/// Default interval of the safety-net re-check while spawns wait.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What one admission attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission<T> {
    /// The spawn may go ahead; `T` is whatever the attempt produced.
    Admitted(T),
    /// Still over a limit; keep waiting.
    StillFull,
}

/// Why a queued spawn was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum QueueError<E> {
    /// `max_waiters` spawns are already waiting.
    #[error("the spawn queue is full")]
    Full,
    /// No capacity was freed for this spawn within `max_wait`.
    #[error("timed out waiting for capacity")]
    Timeout,
    /// The admission attempt itself failed (passed through unchanged).
    #[error(transparent)]
    Admit(E),
}

/// A bounded, FIFO-fair queue of spawns waiting for capacity. Share it by
/// reference (it lives in the service's shared state).
#[derive(Debug)]
pub struct SpawnQueue {
    max_waiters: usize,
    max_wait: Duration,
    poll_interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    next_ticket: u64,
    /// Waiting spawns by ticket, each with the handle that wakes it.
    waiters: BTreeMap<u64, Arc<Notify>>,
    /// The waiter whose turn it is to re-check admission; `None` between
    /// rounds.
    turn: Option<u64>,
    /// Capacity was freed during a round: run another one when it ends.
    pending: bool,
    /// How many times capacity was freed; lets a newcomer notice a
    /// notification that came while it was not registered yet.
    freed: u64,
    /// When the last round started (the poll safety net counts from there).
    last_round: Instant,
}

impl SpawnQueue {
    /// A queue of at most `max_waiters` spawns, each waiting at most
    /// `max_wait`, re-checked every [`DEFAULT_POLL_INTERVAL`] as a safety net.
    pub fn new(max_waiters: usize, max_wait: Duration) -> SpawnQueue {
        SpawnQueue {
            max_waiters,
            max_wait,
            poll_interval: DEFAULT_POLL_INTERVAL,
            state: Mutex::new(State {
                next_ticket: 0,
                waiters: BTreeMap::new(),
                turn: None,
                pending: false,
                freed: 0,
                last_round: Instant::now(),
            }),
        }
    }

    /// The same queue with another safety-net interval (at least 1 ms).
    pub fn with_poll_interval(mut self, interval: Duration) -> SpawnQueue {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many spawns may wait at once.
    pub fn max_waiters(&self) -> usize {
        self.max_waiters
    }

    /// How long one spawn may wait.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// How many spawns are waiting right now.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Says that capacity may have been freed (a sandbox was destroyed or
    /// otherwise stopped counting): waiters re-check admission in ticket
    /// order. Cheap, never blocks; call it even when nobody waits.
    pub fn notify_capacity_freed(&self) {
        let mut state = self.lock();
        state.freed = state.freed.wrapping_add(1);
        if state.turn.is_some() {
            state.pending = true;
        } else {
            state.start_round(Instant::now());
        }
    }

    /// Waits until `try_admit` answers [`Admission::Admitted`], and returns
    /// what it produced.
    ///
    /// When nobody is waiting, `try_admit` runs once right away; otherwise,
    /// or if it answers [`Admission::StillFull`], the caller joins the tail of
    /// the queue ([`QueueError::Full`] if `max_waiters` already wait) and
    /// `try_admit` runs again on its turn in each round, until it is admitted
    /// ([`QueueError::Timeout`] after `max_wait`). An error from `try_admit`
    /// ends the wait and comes back as [`QueueError::Admit`].
    ///
    /// Call this for *every* spawn under `spawn_overflow: queue`, not only
    /// after a refusal: a spawn that checked admission on its own while
    /// others wait could take capacity freed for them.
    ///
    /// The deadline applies to waiting: an attempt in progress is never
    /// interrupted by it, so an attempt that admits is never thrown away.
    /// Dropping the returned future leaves the queue at once; if that happens
    /// during an attempt, the attempt's future is dropped too.
    pub async fn wait_for_capacity<T, E, F, Fut>(
        &self,
        mut try_admit: F,
    ) -> Result<T, QueueError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Admission<T>, E>>,
    {
        let started = Instant::now();
        let deadline = started.checked_add(self.max_wait);

        // Fast path: with nobody waiting there is nobody to overtake.
        let fast_path = {
            let state = self.lock();
            state.waiters.is_empty().then_some(state.freed)
        };
        let mut seen_freed = None;
        if let Some(freed_before) = fast_path {
            match try_admit().await.map_err(QueueError::Admit)? {
                Admission::Admitted(value) => return Ok(value),
                Admission::StillFull => seen_freed = Some(freed_before),
            }
        }

        let notify = Arc::new(Notify::new());
        let ticket = {
            let mut state = self.lock();
            if state.waiters.len() >= self.max_waiters {
                return Err(QueueError::Full);
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiters.insert(ticket, notify.clone());
            if let Some(freed_before) = seen_freed {
                let now = Instant::now();
                if state.freed != freed_before && state.turn.is_none() {
                    // Capacity was freed while we were not registered yet.
                    state.start_round(now);
                } else if state.waiters.len() == 1 {
                    // Our fast attempt was this round; poll from here.
                    state.last_round = now;
                }
            }
            ticket
        };
        let registration = Registration {
            queue: self,
            ticket,
        };

        loop {
            let (my_turn, poll_at) = {
                let state = self.lock();
                let idle_head =
                    state.turn.is_none() && state.waiters.keys().next() == Some(&ticket);
                // Only the head of an idle queue runs the safety-net timer.
                let poll_at = idle_head
                    .then(|| state.last_round.checked_add(self.poll_interval))
                    .flatten();
                (state.turn == Some(ticket), poll_at)
            };

            if deadline.is_some_and(|at| Instant::now() >= at) {
                drop(registration);
                return Err(QueueError::Timeout);
            }
            if my_turn {
                match try_admit().await {
                    Ok(Admission::Admitted(value)) => {
                        drop(registration);
                        return Ok(value);
                    }
                    Ok(Admission::StillFull) => {
                        self.lock().pass_turn(ticket, Instant::now());
                        continue;
                    }
                    Err(error) => {
                        drop(registration);
                        return Err(QueueError::Admit(error));
                    }
                }
            }

            tokio::select! {
                () = notify.notified() => {}
                () = sleep_until(poll_at.unwrap_or(started)), if poll_at.is_some() => {
                    self.lock().poll(Instant::now(), self.poll_interval);
                }
                () = sleep_until(deadline.unwrap_or(started)), if deadline.is_some() => {
                    drop(registration);
                    return Err(QueueError::Timeout);
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent; a poisoned lock
        // carries no half-done change.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Gives the turn to the first waiter, if any.
    fn start_round(&mut self, now: Instant) {
        self.last_round = now;
        self.pending = false;
        match self.waiters.first_key_value() {
            Some((&ticket, notify)) => {
                self.turn = Some(ticket);
                notify.notify_one();
            }
            None => self.turn = None,
        }
    }

    /// `from` is done with its turn (not admitted, or gone): the next waiter
    /// in ticket order gets it; after the last, another round starts if
    /// capacity was freed meanwhile.
    fn pass_turn(&mut self, from: u64, now: Instant) {
        if self.turn != Some(from) {
            return;
        }
        let next = self
            .waiters
            .range((Bound::Excluded(from), Bound::Unbounded))
            .next()
            .map(|(&ticket, notify)| (ticket, notify.clone()));
        match next {
            Some((ticket, notify)) => {
                self.turn = Some(ticket);
                notify.notify_one();
            }
            None if self.pending => self.start_round(now),
            None => {
                self.turn = None;
                // The round is over: the head arms the safety-net timer.
                self.wake_head();
            }
        }
    }

    /// The safety net: between rounds, run one every poll interval.
    fn poll(&mut self, now: Instant, interval: Duration) {
        let due = self
            .last_round
            .checked_add(interval)
            .is_none_or(|at| now >= at);
        if self.turn.is_none() && due {
            self.start_round(now);
        }
    }

    fn wake_head(&self) {
        if let Some(notify) = self.waiters.values().next() {
            notify.notify_one();
        }
    }
}

/// A place in the queue; leaving it (admitted, refused, timed out or dropped)
/// removes the waiter and passes its turn on.
struct Registration<'a> {
    queue: &'a SpawnQueue,
    ticket: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        let was_head = state.waiters.keys().next() == Some(&self.ticket);
        state.waiters.remove(&self.ticket);
        if state.turn == Some(self.ticket) {
            state.pass_turn(self.ticket, Instant::now());
        } else if was_head {
            // A new head must arm the safety-net timer.
            state.wake_head();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::mpsc;
    use tokio::time::timeout;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    /// Generous bound for "promptly" on a loaded machine.
    const PROMPT: Duration = Duration::from_secs(2);

    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    #[error("store unavailable")]
    struct Boom;

    /// Capacity shared by the test's waiters.
    #[derive(Clone, Default)]
    struct Slots(Arc<AtomicUsize>);

    impl Slots {
        fn take(&self) -> bool {
            self.0
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
        fn free(&self, queue: &SpawnQueue) {
            self.0.fetch_add(1, Ordering::SeqCst);
            queue.notify_capacity_freed();
        }
    }

    /// A waiter that is admitted when it can take a slot, reporting `id`.
    fn spawn_waiter(
        queue: &Arc<SpawnQueue>,
        slots: &Slots,
        id: usize,
        admitted: &mpsc::UnboundedSender<usize>,
    ) -> tokio::task::JoinHandle<Result<usize, QueueError<Boom>>> {
        let queue = queue.clone();
        let slots = slots.clone();
        let admitted = admitted.clone();
        tokio::spawn(async move {
            let result = queue
                .wait_for_capacity(|| {
                    let slots = slots.clone();
                    async move {
                        Ok::<_, Boom>(if slots.take() {
                            Admission::Admitted(id)
                        } else {
                            Admission::StillFull
                        })
                    }
                })
                .await;
            if result.is_ok() {
                let _ = admitted.send(id);
            }
            result
        })
    }

    async fn until_waiting(queue: &SpawnQueue, n: usize) {
        timeout(PROMPT, async {
            while queue.waiting() != n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("waiters did not register");
    }

    #[tokio::test]
    async fn admits_at_once_when_capacity_is_there() {
        let queue = SpawnQueue::new(10, HOUR);
        let got = queue
            .wait_for_capacity(|| async { Ok::<_, Boom>(Admission::Admitted(7)) })
            .await;
        assert_eq!(got.unwrap(), 7);
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn fifo_order_under_contention() {
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for id in 0..3 {
            handles.push(spawn_waiter(&queue, &slots, id, &tx));
            until_waiting(&queue, id + 1).await;
        }

        for expected in 0..3 {
            slots.free(&queue);
            let id = timeout(PROMPT, rx.recv()).await.unwrap().unwrap();
            assert_eq!(id, expected);
            until_waiting(&queue, 2 - expected).await;
        }
        for handle in handles {
            assert!(handle.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn a_newcomer_does_not_overtake_waiters() {
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let first = spawn_waiter(&queue, &slots, 0, &tx);
        until_waiting(&queue, 1).await;

        // Capacity appears without a notification yet; a newcomer must not
        // take it: it joins the tail without trying.
        slots.0.fetch_add(1, Ordering::SeqCst);
        let newcomer = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;
        queue.notify_capacity_freed();
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(0));
        assert!(first.await.unwrap().is_ok());

        slots.free(&queue);
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(1));
        assert!(newcomer.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_waiter_that_cannot_go_does_not_block_later_ones() {
        // Waiter 0 stands for an owner at its own cap: never admitted.
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let blocked = {
            let queue = queue.clone();
            tokio::spawn(async move {
                queue
                    .wait_for_capacity(|| async {
                        Ok::<Admission<usize>, Boom>(Admission::StillFull)
                    })
                    .await
            })
        };
        until_waiting(&queue, 1).await;
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let later = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;

        slots.free(&queue);
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(1));
        assert!(later.await.unwrap().is_ok());
        assert_eq!(queue.waiting(), 1);
        blocked.abort();
    }

    #[tokio::test]
    async fn refuses_when_full() {
        let queue = Arc::new(SpawnQueue::new(2, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = spawn_waiter(&queue, &slots, 0, &tx);
        until_waiting(&queue, 1).await;
        let b = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;

        let attempts = AtomicUsize::new(0);
        let third = timeout(
            PROMPT,
            queue.wait_for_capacity(|| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async { Ok::<Admission<()>, Boom>(Admission::Admitted(())) }
            }),
        )
        .await
        .expect("a full queue refuses at once");
        assert!(matches!(third, Err(QueueError::Full)));
        // It did not even try: that would have overtaken the waiters.
        assert_eq!(attempts.load(Ordering::SeqCst), 0);
        assert_eq!(queue.waiting(), 2);
        a.abort();
        b.abort();
    }

    #[tokio::test]
    async fn zero_waiters_tries_once_then_refuses() {
        let queue = SpawnQueue::new(0, HOUR);
        let admitted = queue
            .wait_for_capacity(|| async { Ok::<_, Boom>(Admission::Admitted(1)) })
            .await;
        assert_eq!(admitted.unwrap(), 1);
        let full = queue
            .wait_for_capacity(|| async { Ok::<Admission<()>, Boom>(Admission::StillFull) })
            .await;
        assert!(matches!(full, Err(QueueError::Full)));
    }

    #[tokio::test]
    async fn times_out_and_leaves_the_queue() {
        let queue = SpawnQueue::new(10, Duration::from_millis(150))
            .with_poll_interval(Duration::from_millis(20));
        let attempts = AtomicUsize::new(0);
        let started = Instant::now();
        let result = timeout(
            PROMPT,
            queue.wait_for_capacity(|| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async { Ok::<Admission<()>, Boom>(Admission::StillFull) }
            }),
        )
        .await
        .expect("the deadline ends the wait");
        assert!(matches!(result, Err(QueueError::Timeout)));
        assert!(started.elapsed() >= Duration::from_millis(150));
        // The safety net re-checked while waiting, without a notification.
        assert!(attempts.load(Ordering::SeqCst) >= 2);
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn passes_the_admission_error_through() {
        let queue = SpawnQueue::new(10, HOUR);
        let result = queue
            .wait_for_capacity(|| async { Err::<Admission<()>, _>(Boom) })
            .await;
        assert!(matches!(result, Err(QueueError::Admit(Boom))));
        assert_eq!(
            QueueError::<Boom>::Admit(Boom).to_string(),
            "store unavailable"
        );

        // Also from inside the queue, and the turn moves on.
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = {
            let queue = queue.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                queue
                    .wait_for_capacity(|| {
                        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                        async move {
                            if first {
                                Ok::<Admission<()>, Boom>(Admission::StillFull)
                            } else {
                                Err(Boom)
                            }
                        }
                    })
                    .await
            })
        };
        until_waiting(&queue, 1).await;
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let next = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;
        slots.free(&queue);
        let failed = timeout(PROMPT, failing).await.unwrap().unwrap();
        assert!(matches!(failed, Err(QueueError::Admit(Boom))));
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(1));
        assert!(next.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_block_the_next() {
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let gone = spawn_waiter(&queue, &slots, 0, &tx);
        until_waiting(&queue, 1).await;
        let next = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;

        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(queue.waiting(), 1);
        slots.free(&queue);
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(1));
        assert!(next.await.unwrap().is_ok());
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn a_waiter_dropped_during_its_attempt_passes_the_turn() {
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let calls = Arc::new(AtomicUsize::new(0));
        let stuck = {
            let queue = queue.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                queue
                    .wait_for_capacity(|| {
                        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                        async move {
                            if first {
                                Ok::<Admission<()>, Boom>(Admission::StillFull)
                            } else {
                                // The second attempt hangs (a stuck store).
                                std::future::pending().await
                            }
                        }
                    })
                    .await
            })
        };
        until_waiting(&queue, 1).await;
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let next = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;

        slots.free(&queue);
        timeout(PROMPT, async {
            while calls.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first waiter got its turn");
        stuck.abort();
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(1));
        assert!(next.await.unwrap().is_ok());
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn notify_wakes_waiters_promptly() {
        // The safety net is an hour away: only the notification can help.
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let waiter = spawn_waiter(&queue, &slots, 0, &tx);
        until_waiting(&queue, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(rx.try_recv().is_err());

        let freed_at = Instant::now();
        slots.free(&queue);
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(0));
        assert!(freed_at.elapsed() < PROMPT);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn capacity_freed_during_the_first_attempt_is_not_lost() {
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let calls = AtomicUsize::new(0);
        let result = timeout(
            PROMPT,
            queue.wait_for_capacity(|| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                let (queue, slots) = (queue.clone(), slots.clone());
                async move {
                    if first {
                        // A sandbox is destroyed while this attempt runs,
                        // before the spawn has joined the queue.
                        slots.free(&queue);
                        return Ok::<_, Boom>(Admission::StillFull);
                    }
                    Ok(if slots.take() {
                        Admission::Admitted(())
                    } else {
                        Admission::StillFull
                    })
                }
            }),
        )
        .await
        .expect("the notification must not be lost");
        assert!(result.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn capacity_freed_during_a_round_runs_another() {
        let queue = Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(HOUR));
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = spawn_waiter(&queue, &slots, 0, &tx);
        until_waiting(&queue, 1).await;
        let b = spawn_waiter(&queue, &slots, 1, &tx);
        until_waiting(&queue, 2).await;

        // Two sandboxes go away back to back: both waiters get in.
        slots.free(&queue);
        slots.free(&queue);
        let mut got = vec![
            timeout(PROMPT, rx.recv()).await.unwrap().unwrap(),
            timeout(PROMPT, rx.recv()).await.unwrap().unwrap(),
        ];
        got.sort_unstable();
        assert_eq!(got, vec![0, 1]);
        assert!(a.await.unwrap().is_ok());
        assert!(b.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn the_safety_net_admits_without_a_notification() {
        let queue =
            Arc::new(SpawnQueue::new(10, HOUR).with_poll_interval(Duration::from_millis(20)));
        let slots = Slots::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let waiter = spawn_waiter(&queue, &slots, 0, &tx);
        until_waiting(&queue, 1).await;
        slots.0.fetch_add(1, Ordering::SeqCst); // freed, but nobody says so
        assert_eq!(timeout(PROMPT, rx.recv()).await.unwrap(), Some(0));
        assert!(waiter.await.unwrap().is_ok());
    }
}
