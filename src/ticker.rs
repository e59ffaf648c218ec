//! The one way background loops keep time.

use std::time::Duration;

/// An interval for a loop whose work may take longer than its period (a
/// heartbeat waiting on a lost peer, a slow reconcile pass): a late tick
/// delays the next ones instead of firing every missed tick at once,
/// which after a partition would send a burst of hundreds of heartbeats.
pub fn every(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_does_not_make_a_burst() {
        let mut tick = every(Duration::from_millis(200));
        tick.tick().await; // the first tick is immediate
        // The loop's work took ten periods.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = tokio::time::Instant::now();
        tick.tick().await; // the late one, at once
        tick.tick().await; // then a full period later, not at once
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }
}
