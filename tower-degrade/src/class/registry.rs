//! The registry: the set of configured classes, fixed when the degrader is built.

use std::collections::HashMap;

use super::{ClassConfig, MAX_CLASSES, Tier};
use crate::error::ConfigError;

/// The index of a class in its [`Registry`]. Index 0 is always the default class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub(crate) u16);

impl ClassId {
    /// The default class, which receives all traffic no rule matched.
    pub const DEFAULT: ClassId = ClassId(0);

    /// The index of this class in the registry.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// The set of configured classes, fixed when the degrader is built.
///
/// Class names are the only values that reach metric labels, so label cardinality is bounded
/// by configuration, whatever clients send.
#[derive(Debug, Clone)]
pub struct Registry {
    classes: Vec<ClassConfig>,
    by_name: HashMap<String, ClassId>,
    /// The default class was configured (`DegraderBuilder::default_class`), not implied.
    default_configured: bool,
    /// Per class, a hash of the class names up to it, in id order: two registries whose
    /// entries agree at the shorter one's last class give the ids they share to the same
    /// classes.
    ids_keys: Box<[u64]>,
}

/// The name of the default class.
pub const DEFAULT_CLASS: &str = "default";

/// The most dependencies a class names (`ClassConfig::depends_on`): 50,000 took a config
/// file 15 s to load and 9 more to build, in a hostile trial.
const MAX_DEPENDENCIES: usize = 64;

impl Registry {
    /// Build a registry: `default` (or a bronze class with the `reject` route) as the default
    /// class, then `classes` in order. A class in `classes` may not be named [`DEFAULT_CLASS`].
    pub(crate) fn new(
        default: Option<ClassConfig>,
        classes: Vec<ClassConfig>,
    ) -> Result<Self, ConfigError> {
        if classes.len() >= MAX_CLASSES {
            return Err(ConfigError::TooManyClasses(classes.len()));
        }
        let default_configured = default.is_some();
        let mut default = default.unwrap_or_else(|| ClassConfig::new(DEFAULT_CLASS, Tier::Bronze));
        default.name = DEFAULT_CLASS.to_owned();
        let mut all = Vec::with_capacity(classes.len() + 1);
        all.push(default);
        for class in classes {
            if class.name == DEFAULT_CLASS {
                return Err(ConfigError::InvalidClass {
                    class: class.name,
                    field: "name",
                    reason: "`default` is reserved for unclassified calls: configure it with \
                             `DegraderBuilder::default_class`"
                        .into(),
                });
            }
            // A policy's `governs: ["gold"]` names the tier: a class so named must be of it,
            // or a policy meant for it governs the tier's classes (the gold tier shed by a
            // policy written for a bronze class named `gold`).
            if let Ok(tier) = class.name.parse::<Tier>()
                && tier != class.tier()
            {
                return Err(ConfigError::InvalidClass {
                    reason: format!(
                        "`{}` is a tier's name, which a policy's `governs` reads as every class \
                         of that tier: a class so named must be of it (this one is {}); rename it",
                        class.name,
                        class.tier()
                    ),
                    class: class.name,
                    field: "name",
                });
            }
            all.push(class);
        }
        let mut by_name = HashMap::with_capacity(all.len());
        for (i, class) in all.iter().enumerate() {
            let valid = !class.name.is_empty()
                && class.name.len() <= 64
                && class
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
                // A dot segment: no URL path can name it (the admin API's, a browser's).
                && class.name != "."
                && class.name != "..";
            if !valid {
                return Err(ConfigError::InvalidName(class.name.clone()));
            }
            validate(class)?;
            if by_name
                .insert(class.name.clone(), ClassId(i as u16))
                .is_some()
            {
                return Err(ConfigError::DuplicateClass(class.name.clone()));
            }
        }
        let ids_keys = ids_keys(all.iter().map(|c| c.name.as_str()));
        Ok(Self {
            classes: all,
            by_name,
            default_configured,
            ids_keys,
        })
    }

    /// Whether the ids both registries have name the same classes: the classes of one are
    /// the first classes of the other, in the same order (one degrader's registry and its
    /// clones, two degraders configured alike, or one with classes added at the end). Compared
    /// by a 64-bit hash of the names, computed once: cheap enough for every call.
    #[inline]
    pub fn same_ids(&self, other: &Registry) -> bool {
        let n = self.ids_keys.len().min(other.ids_keys.len());
        // Both have the default class: `n` is at least 1.
        self.ids_keys.get(n - 1) == other.ids_keys.get(n - 1)
    }

    /// Look a class up by name (no allocation).
    pub fn get(&self, name: &str) -> Option<ClassId> {
        self.by_name.get(name).copied()
    }

    /// Look a class up by name, or fail with [`ConfigError::UnknownClass`].
    pub fn require(&self, name: &str) -> Result<ClassId, ConfigError> {
        self.get(name)
            .ok_or_else(|| ConfigError::UnknownClass(name.to_owned()))
    }

    /// The class with this id.
    ///
    /// # Panics
    ///
    /// If `id` does not come from this registry.
    pub fn class(&self, id: ClassId) -> &ClassConfig {
        &self.classes[id.index()]
    }

    /// Whether the default class was configured rather than implied: tier and `*` policy
    /// selectors reach it only then (policies are behind the `rhai` feature).
    #[cfg_attr(not(feature = "rhai"), allow(dead_code))]
    pub(crate) fn default_configured(&self) -> bool {
        self.default_configured
    }

    /// Number of classes, the default class included.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Always false: the default class exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every class with its id, the default class first.
    pub fn iter(&self) -> impl Iterator<Item = (ClassId, &ClassConfig)> + '_ {
        self.classes
            .iter()
            .enumerate()
            .map(|(i, c)| (ClassId(i as u16), c))
    }
}

/// FNV-1a over the names, each ended by a byte no name has (names are ASCII): the hash after
/// each name.
fn ids_keys<'a>(names: impl Iterator<Item = &'a str>) -> Box<[u64]> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    names
        .map(|name| {
            for b in name.bytes().chain(std::iter::once(0xff)) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        })
        .collect()
}

/// Check the values that would make the class meaningless, naming the first bad field.
fn validate(class: &ClassConfig) -> Result<(), ConfigError> {
    let bad = |field: &'static str, reason: &str| {
        Err(ConfigError::InvalidClass {
            class: class.name.clone(),
            field,
            reason: reason.to_owned(),
        })
    };
    if class.sla.is_zero() {
        return bad("sla", "must be greater than zero: every call would be slow");
    }
    if class.abandon_after().is_some_and(|t| t.is_zero()) {
        return bad(
            "abandon_timeout",
            "must be greater than zero: every abandoned call would be a timeout",
        );
    }
    if class.timeout.is_some_and(|t| t.is_zero()) {
        return bad(
            "timeout",
            "must be greater than zero: every call would time out",
        );
    }
    if class.dependencies.len() > MAX_DEPENDENCIES {
        return bad(
            "depends_on",
            &format!(
                "{} dependencies: a class names at most {MAX_DEPENDENCIES} (policies read \
                 them, faults target them, and the first names its admission limiter)",
                class.dependencies.len()
            ),
        );
    }
    if class.dependencies.iter().any(|d| d.trim().is_empty()) {
        return bad("depends_on", "a dependency name must not be empty");
    }
    // A dependency names an admission limiter (a metric label and a log field): no line of
    // its own, no unbounded label.
    if let Some(d) = class
        .dependencies
        .iter()
        .find(|d| d.len() > 64 || d.chars().any(char::is_control))
    {
        return bad(
            "depends_on",
            &format!(
                "{:?} must be at most 64 bytes with no control character: it labels metrics \
                 and log lines",
                crate::error::escape_cut(d, 64)
            ),
        );
    }
    if let Some((_, d)) = class
        .dependencies
        .iter()
        .enumerate()
        .find(|(i, d)| class.dependencies[..*i].contains(d))
    {
        return bad("depends_on", &format!("`{d}` is named twice"));
    }
    let day = crate::error::MAX_DURATION;
    for (field, d) in [
        ("sla", Some(class.sla)),
        ("abandon_timeout", class.abandon_after()),
        ("timeout", class.timeout),
        ("max_queue_delay", Some(class.queue_delay_bound())),
    ] {
        if d.is_some_and(|d| d > day) {
            return bad(field, "must be at most a day (leave it unset for none)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_class_names_at_most_64_dependencies() {
        let many = |n: usize| {
            (0..n).fold(ClassConfig::gold("pay"), |c, i| {
                c.depends_on(format!("dep{i}"))
            })
        };
        assert!(Registry::new(None, vec![many(64)]).is_ok());
        let err = Registry::new(None, vec![many(50_000)]).unwrap_err();
        assert!(err.to_string().contains("50000 dependencies"), "{err}");
    }

    #[test]
    fn a_degrader_has_at_most_max_classes_the_default_among_them() {
        let classes = |n: usize| -> Vec<_> {
            (0..n)
                .map(|i| ClassConfig::bronze(format!("c{i}")))
                .collect()
        };
        let most = Registry::new(None, classes(MAX_CLASSES - 1)).unwrap();
        assert_eq!(most.len(), MAX_CLASSES);
        let e = Registry::new(None, classes(MAX_CLASSES)).unwrap_err();
        assert_eq!(e, ConfigError::TooManyClasses(MAX_CLASSES));
        assert!(
            e.to_string()
                .starts_with("1024 classes configured: at most 1023"),
            "{e}"
        );
    }

    #[test]
    fn default_class_is_first_and_overridable() {
        let r = Registry::new(None, vec![ClassConfig::gold("pay")]).unwrap();
        assert_eq!(r.get(DEFAULT_CLASS), Some(ClassId::DEFAULT));
        assert_eq!(r.class(ClassId::DEFAULT).tier(), Tier::Bronze);
        let r = Registry::new(
            Some(ClassConfig::silver("anything")),
            vec![ClassConfig::gold("pay")],
        )
        .unwrap();
        assert_eq!(r.class(ClassId::DEFAULT).name(), DEFAULT_CLASS);
        assert_eq!(r.class(ClassId::DEFAULT).tier(), Tier::Silver);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn bad_names_and_duplicates_are_rejected() {
        assert_eq!(
            Registry::new(None, vec![ClassConfig::gold("a"), ClassConfig::gold("a")]).unwrap_err(),
            ConfigError::DuplicateClass("a".into())
        );
        // `.` and `..` are dot segments: no URL path names them (the status page's buttons
        // posted a command for `..` to `/force_open`). Other names of dots are paths' own.
        for bad in ["a b", ".", ".."] {
            assert!(matches!(
                Registry::new(None, vec![ClassConfig::gold(bad)]).unwrap_err(),
                ConfigError::InvalidName(_)
            ));
        }
        assert!(Registry::new(None, vec![ClassConfig::gold("...")]).is_ok());
        let err = Registry::new(None, vec![ClassConfig::gold(DEFAULT_CLASS)]).unwrap_err();
        assert!(err.to_string().contains("default_class"), "{err}");
    }

    #[test]
    fn tier_defaults_follow_the_seed() {
        assert_eq!(Tier::Gold.base_weight(), 0.45);
        assert_eq!(Tier::Silver.default_sla(), Duration::from_millis(200));
        assert_eq!(Tier::Bronze.burst_tolerance(), 1.2);
    }
}
