//! The anomaly rules, one per file. Each declares its kind, its default, how its threshold is
//! read, what it observes and what it raises and resolves:
//!
//! - `deadlines.rs` with `thresholds.rs`: a socket lingering in a state past its threshold
//!   (`close_wait`, `fin_wait2`, ...), judged when its deadline comes due;
//! - `leak.rs`: one holder with too many sockets in lingering states;
//! - `pressure.rs`: `time_wait_pressure`, one destination's TIME_WAIT against the ephemeral
//!   port range, observing TIME_WAIT sockets come and go;
//! - `backlog.rs`: `accept_queue_full`, observing listener polls;
//! - `orphans.rs`: `orphan_pressure`, observing the host's orphan and memory counts;
//! - `churn.rs`: `connection_churn`, observing each flow window's connections per
//!   destination.
//!
//! The rules that keep their own anomalies (the last four) are host rules: each implements
//! [`Rule`] (what the tracker and the outputs ask of it, and the observations it wants) and
//! [`HostRule`] (its name, setting, default, parsing and detail), and one line of
//! `host_rules!` (at the end of this file) registers it. That line makes its [`RuleId`] (the `kind` of its records),
//! its [`RuleDetail`] variant, its [`RuleSetting`] (`--threshold NAME=VALUE`), its field of
//! [`RuleSettings`] (the tracker's configuration) and of [`HostRules`] (the engine's
//! registry), so a new rule is its file plus that line.

pub mod deadlines;
pub mod leak;
pub mod thresholds;

use std::{collections::HashMap, time::Duration};

use super::{
    PeerKeyHasher, Task,
    destinations::{Dest, Flow},
    facts::{Anomaly, Fact, Kind},
    table::{Comms, Table},
};
use crate::{record::AnomalyRecord, socket::Tuple};

/// What the tracker and the outputs ask of every rule that raises and resolves its own
/// anomalies, and the observations it may take: each hook's default ignores it, so a rule
/// implements only what it watches. The tracker calls every rule wherever an observation
/// arrives.
pub trait Rule: std::fmt::Debug {
    /// The kind it raises (its wire name is `kind().name()`).
    fn kind(&self) -> Kind;
    /// Whether the configuration turned it on (`--threshold NAME=off` turns it off).
    fn enabled(&self) -> bool;
    /// Anomalies raised since start.
    fn raised_total(&self) -> u64;
    /// Anomalies open now.
    fn open(&self) -> u64;
    /// The open anomalies as of `now_ns`, for the status page. `table` and `comms` are the
    /// socket table's, for rules that name the sockets behind a host-wide count.
    fn open_anomalies(&self, now_ns: u64, table: &Table, comms: &Comms) -> Vec<Anomaly>;

    /// The tracker's tick (its expiry pass), at `now_ns`.
    fn tick(&mut self, _now_ns: u64, _out: &mut Vec<Fact>) {}
    /// A flow window, each tick: the last whole one's connections per destination.
    fn flow_window(&mut self, _w: &FlowWindow<'_>, _out: &mut Vec<Fact>) {}
    /// Whether listeners' accept queues are to be polled for it.
    fn polls_listeners(&self) -> bool {
        false
    }
    /// A poll of listeners' accept queues in `namespaces`, taken at `at_ns`.
    fn listeners_polled(
        &mut self,
        _at_ns: u64,
        _namespaces: &[u32],
        _listeners: &[backlog::Listening],
        _out: &mut Vec<Fact>,
    ) {
    }
    /// Whether the host's orphan and TCP memory counts are to be read for it.
    fn reads_host(&self) -> bool {
        false
    }
    /// A reading of the host's orphan and TCP memory counts; `by_owner` counts the closing
    /// sockets per last holder (a walk of the table: call it only when needed).
    fn host_read(
        &mut self,
        _now_ns: u64,
        _host: orphans::HostTcp,
        _by_owner: &dyn Fn() -> Vec<(Task, u64)>,
        _out: &mut Vec<Fact>,
    ) {
    }
    /// A TIME_WAIT mini-socket is tracked (`active`: this host closed first, so it holds an
    /// ephemeral port).
    fn time_wait_added(
        &mut self,
        _netns: u32,
        _tuple: &Tuple,
        _active: bool,
        _now_ns: u64,
        _out: &mut Vec<Fact>,
    ) {
    }
    /// A TIME_WAIT mini-socket ended.
    fn time_wait_removed(
        &mut self,
        _netns: u32,
        _tuple: &Tuple,
        _ts_ns: u64,
        _out: &mut Vec<Fact>,
    ) {
    }
    /// A connect to `tuple`'s destination found no free local port (EADDRNOTAVAIL).
    fn refused_port(&mut self, _netns: u32, _tuple: &Tuple, _by: Option<Task>) {}
    /// A bind to port 0 in `netns` found no free port at all (EADDRINUSE).
    fn bind_refused(&mut self, _netns: u32, _by: Task) {}
}

/// One flow window, as the tracker hands it to the rules.
pub struct FlowWindow<'a> {
    /// When the window began.
    pub start_ns: u64,
    /// Its connections per destination; None when whole windows passed without any.
    pub flows: Option<&'a HashMap<Dest, Flow, PeerKeyHasher>>,
    /// A destination's TIME_WAIT sockets now.
    pub time_wait: &'a dyn Fn(&Dest) -> u32,
    pub now_ns: u64,
}

/// What a host rule declares about itself, beside what [`Rule`] asks of it (kept apart
/// because its associated types and consts would make [`Rule`] unusable as `dyn`).
pub trait HostRule: Rule + Sized {
    /// Its kind's wire name, and the name `--threshold NAME=VALUE` takes: never renamed.
    const NAME: &'static str;
    /// What `--threshold NAME=VALUE` sets.
    type Setting: Copy + std::fmt::Debug + PartialEq;
    /// What its anomalies say beyond the common fields.
    type Detail: Clone + std::fmt::Debug + PartialEq;
    /// Its setting unless told otherwise (None: off by default).
    const DEFAULT: Option<Self::Setting>;
    /// Whether its anomalies' owners are worth checking in /proc (not for a destination,
    /// which no process holds).
    const CHECKS_OWNER: bool = true;
    /// Parses the VALUE of `--threshold NAME=VALUE` (None: off).
    fn parse(value: &str) -> Result<Option<Self::Setting>, String>;
    fn new(setting: Option<Self::Setting>) -> Self;
    /// A setting's duration, for the CLI's bound on durations (None: not one).
    fn longest(_setting: &Self::Setting) -> Option<Duration> {
        None
    }
    /// Fills the record of one of its anomalies with its detail: a new rule's fields go to
    /// `rec.extra`.
    fn record(detail: &Self::Detail, rec: &mut AnomalyRecord);
    /// Writes the text line of one of its records (read back from a log by `tail`, so from
    /// the record); false leaves it to the common line.
    fn text(_out: &mut String, _label: &str, _rec: &AnomalyRecord) -> bool {
        false
    }
}

/// Registers the host rules, one line each: `Variant / field => module::Type`. `Variant`
/// names the rule in [`RuleId`], [`RuleDetail`] and [`RuleSetting`]; `field` names it in
/// [`RuleSettings`] and [`HostRules`], where tracker code calls a rule's own methods;
/// `module` is its file, declared here.
macro_rules! host_rules {
    ($($id:ident / $field:ident => $module:ident :: $rule:ident),+ $(,)?) => {
        $(pub mod $module;)+
        host_rules!(@ $($id / $field => $module::$rule),+);
    };
    (@ $($id:ident / $field:ident => $ty:ty),+) => {
        /// A host rule, as `Kind::Rule` names it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum RuleId {
            $($id),+
        }

        impl RuleId {
            /// Every rule, in the order the outputs list them.
            pub const ALL: &[RuleId] = &[$(RuleId::$id),+];
            pub const COUNT: usize = Self::ALL.len();

            /// Its wire name (the rule's `NAME`).
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$id => <$ty as HostRule>::NAME),+
                }
            }

            /// The rule of that [`name`](Self::name).
            pub fn parse(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|id| id.name() == name)
            }

            pub fn checks_owner(self) -> bool {
                match self {
                    $(Self::$id => <$ty as HostRule>::CHECKS_OWNER),+
                }
            }

            /// Writes the rule's own text line for `rec`, when it has one.
            pub fn text(self, out: &mut String, label: &str, rec: &AnomalyRecord) -> bool {
                match self {
                    $(Self::$id => <$ty as HostRule>::text(out, label, rec)),+
                }
            }
        }

        /// A host rule's detail: one variant per rule.
        #[derive(Clone, Debug, PartialEq)]
        pub enum RuleDetail {
            $($id(<$ty as HostRule>::Detail)),+
        }

        impl RuleDetail {
            pub fn id(&self) -> RuleId {
                match self {
                    $(Self::$id(_) => RuleId::$id),+
                }
            }

            /// Fills `rec` with the detail, as its rule does.
            pub fn record(&self, rec: &mut AnomalyRecord) {
                match self {
                    $(Self::$id(d) => <$ty as HostRule>::record(d, rec)),+
                }
            }
        }

        /// One `--threshold NAME=VALUE` for a host rule (None: off).
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub enum RuleSetting {
            $($id(Option<<$ty as HostRule>::Setting>)),+
        }

        impl RuleSetting {
            /// Parses VALUE for the rule called `name` (any case); None when no rule is.
            pub fn parse(name: &str, value: &str) -> Option<Result<Self, String>> {
                let name = name.trim();
                $(
                    if name.eq_ignore_ascii_case(<$ty as HostRule>::NAME) {
                        return Some(<$ty as HostRule>::parse(value).map(Self::$id));
                    }
                )+
                None
            }

            /// The setting's duration, when it is one.
            pub fn longest(&self) -> Option<Duration> {
                match self {
                    $(Self::$id(s) => s.as_ref().and_then(<$ty as HostRule>::longest)),+
                }
            }
        }

        /// Every host rule's setting (None: off).
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct RuleSettings {
            $(pub $field: Option<<$ty as HostRule>::Setting>),+
        }

        impl Default for RuleSettings {
            /// Each rule's default, declared beside it.
            fn default() -> Self {
                Self {
                    $($field: <$ty as HostRule>::DEFAULT),+
                }
            }
        }

        impl RuleSettings {
            /// Every rule off: tests turn on the ones they are about
            /// (`RuleSettings { churn: Some(..), ..RuleSettings::off() }`).
            pub fn off() -> Self {
                Self {
                    $($field: None),+
                }
            }

            pub fn set(&mut self, s: RuleSetting) {
                match s {
                    $(RuleSetting::$id(v) => self.$field = v),+
                }
            }
        }

        /// The engine's registry of host rules, each fed by the tracker where its
        /// observations arrive (TIME_WAIT births and ends, listener polls, host readings, flow
        /// windows, ticks).
        #[derive(Debug)]
        pub struct HostRules {
            $(pub $field: $ty),+
        }

        impl HostRules {
            pub fn new(s: &RuleSettings) -> Self {
                Self {
                    $($field: <$ty as HostRule>::new(s.$field)),+
                }
            }

            /// Every rule, in the order the outputs list them.
            pub fn each(&self) -> [&dyn Rule; RuleId::COUNT] {
                [$(&self.$field),+]
            }

            /// Every rule, to feed it an observation.
            pub fn each_mut(&mut self) -> [&mut dyn Rule; RuleId::COUNT] {
                [$(&mut self.$field),+]
            }
        }
    };
}

host_rules! {
    TimeWaitPressure / pressure => pressure::PressureRule,
    AcceptQueueFull / backlog => backlog::BacklogRule,
    OrphanPressure / orphans => orphans::OrphanRule,
    ConnectionChurn / churn => churn::ChurnRule,
}
