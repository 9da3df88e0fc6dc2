//! The whole machine's CPU time, read by the throughput and commit-path benches.

// Each bench uses what it needs of it.
#![allow(dead_code)]

/// The whole machine's CPU time (`/proc/stat`, all CPUs), in clock ticks: busy, stolen by the
/// hypervisor, and all of it. A latency run that keeps the CPUs busy measures the machine's
/// queues, not the daemon's path.
#[derive(Clone, Copy)]
pub struct Machine {
    busy: u64,
    steal: u64,
    all: u64,
}

impl Machine {
    pub fn sample() -> Machine {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal guest guest_nice (guest time is in user).
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        let (idle, steal) = (at(3) + at(4), at(7));
        let all: u64 = ticks.iter().sum();
        Machine {
            busy: all - idle - steal,
            steal,
            all,
        }
    }

    pub fn since(&self, before: &Machine) -> Machine {
        Machine {
            busy: self.busy - before.busy,
            steal: self.steal - before.steal,
            all: self.all - before.all,
        }
    }

    /// The share of the time that was stolen.
    pub fn stolen(&self) -> f64 {
        self.steal as f64 / self.all.max(1) as f64
    }

    /// The shares busy and stolen, `"b % / s %"`.
    pub fn shares(&self) -> String {
        let share = |ticks: u64| ticks as f64 * 100.0 / self.all.max(1) as f64;
        format!("{:.0} % / {:.0} %", share(self.busy), share(self.steal))
    }
}
