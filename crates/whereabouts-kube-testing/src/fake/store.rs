//! The in-memory "etcd": resource types, objects, the global resourceVersion counter, the event
//! history and the live watch subscribers.
//!
//! Everything here is synchronous and runs under the one state mutex, so each change is atomic and
//! its event is recorded and delivered in resourceVersion order. Request-level rules (admission,
//! preconditions, finalizers) live in `verbs`; this module only stores and notifies.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::crd;
use super::resource::{Behaviour, ResourceType, TypeKey, builtin_types};

/// How many events the watch history keeps (etcd keeps a time window instead)...
pub(crate) const HISTORY_LIMIT: usize = 100_000;

/// ... unless their objects take more memory than this (roughly): a benchmark rewriting a big pool
/// many times must not exhaust memory. Watches from forgotten versions get 410, as after compaction.
const HISTORY_BYTES: usize = 1 << 30;

/// A rough count of the memory a JSON value takes.
fn approximate_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 16,
        Value::String(text) => 24 + text.len(),
        Value::Array(items) => 24 + items.iter().map(approximate_size).sum::<usize>(),
        Value::Object(map) => {
            48 + map.iter().map(|(key, value)| 32 + key.len() + approximate_size(value)).sum::<usize>()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One stored change.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) resource_version: u64,
    pub(crate) event_type: EventType,
    pub(crate) type_key: TypeKey,
    pub(crate) namespace: String,
    /// The new state (for DELETED: the last state, carrying the deletion's resourceVersion).
    pub(crate) object: Arc<Value>,
    /// The state before a MODIFIED event, so that a watch with a selector can turn the event into
    /// ADDED or DELETED when the object starts or stops matching, as the real watch cache does.
    pub(crate) previous: Option<Arc<Value>>,
}

/// A live watch: receives every event of its type (and namespace, if it has one).
#[derive(Debug)]
struct Subscriber {
    type_key: TypeKey,
    namespace: Option<String>,
    sender: UnboundedSender<Arc<Event>>,
}

/// (namespace, name); the namespace is "" for cluster-scoped objects. Ordered as LIST answers.
type ObjectKey = (String, String);

#[derive(Debug)]
pub(crate) struct State {
    /// Served types by (group, version, plural).
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
    objects: HashMap<TypeKey, BTreeMap<ObjectKey, Arc<Value>>>,
    resource_version: u64,
    /// The recorded events, oldest first, with the approximate size of their objects.
    history: VecDeque<(usize, Arc<Event>)>,
    /// The approximate size of the objects of the kept events.
    history_bytes: usize,
    /// Events at or below this resourceVersion are forgotten (compacted).
    history_floor: u64,
    subscribers: Vec<Subscriber>,
    /// The size of the last object stored, and of its managed fields (what its write costs).
    last_stored: Option<(Arc<Value>, bool)>,
}

/// The `metadata` map of an object; objects always have one once admitted.
pub(crate) fn metadata_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    object.get_mut("metadata").and_then(Value::as_object_mut)
}

/// A string field of `metadata` ("" when absent).
pub(crate) fn metadata_str<'a>(object: &'a Value, key: &str) -> &'a str {
    object.get("metadata").and_then(|m| m.get(key)).and_then(Value::as_str).unwrap_or_default()
}

impl State {
    /// A state serving the built-in types, with no objects.
    pub(crate) fn new() -> State {
        let mut state = State {
            types: BTreeMap::new(),
            objects: HashMap::new(),
            resource_version: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            history_floor: 0,
            subscribers: Vec::new(),
            last_stored: None,
        };
        for rt in builtin_types() {
            state.register(rt);
        }
        state
    }

    fn register(&mut self, rt: ResourceType) {
        self.types.insert((rt.group.clone(), rt.version.clone(), rt.plural.clone()), Arc::new(rt));
    }

    pub(crate) fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types.get(&(group.to_owned(), version.to_owned(), plural.to_owned())).cloned()
    }

    /// Every served type, ordered by group, version, plural.
    pub(crate) fn types(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// The size of the last object stored and of its managed fields (see [`State::put`]), measured
    /// when asked: only a server with costs per size asks.
    pub(crate) fn last_stored_size(&self) -> (usize, usize) {
        let Some((object, cleared)) = &self.last_stored else { return (0, 0) };
        let bytes = |value: &Value| serde_json::to_vec(value).map_or(0, |bytes| bytes.len());
        let object_bytes = bytes(object);
        let managed_bytes = match object.get("metadata") {
            Some(metadata) if !cleared => object_bytes.saturating_sub(bytes(metadata)),
            _ => 0,
        };
        (object_bytes, managed_bytes)
    }

    /// The current (latest) resourceVersion.
    pub(crate) fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub(crate) fn get(&self, type_key: &TypeKey, namespace: &str, name: &str) -> Option<&Arc<Value>> {
        self.objects.get(type_key)?.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The objects of a type, in one namespace or all, ordered by namespace and name.
    pub(crate) fn list(&self, type_key: &TypeKey, namespace: Option<&str>) -> Vec<Arc<Value>> {
        let Some(objects) = self.objects.get(type_key) else { return Vec::new() };
        match namespace {
            None => objects.values().cloned().collect(),
            Some(namespace) => objects
                .range((namespace.to_owned(), String::new())..)
                .take_while(|((ns, _), _)| ns == namespace)
                .map(|(_, object)| object.clone())
                .collect(),
        }
    }

    pub(crate) fn namespace(&self, name: &str) -> Option<&Arc<Value>> {
        self.get(&TypeKey { group: String::new(), plural: "namespaces".to_owned() }, "", name)
    }

    fn next_resource_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Stores an admitted object (creating or replacing it) under a new resourceVersion, records
    /// and delivers its event, and returns what was stored. A stored CRD (re)registers its types.
    ///
    /// managedFields are not kept, only their size: a real server lists in them every field a write
    /// set (for an object written by JSON or merge patches and updates, roughly as large as everything
    /// but its metadata), unless the write sets them to `[{}]`, which clears them.
    pub(crate) fn put(&mut self, rt: &ResourceType, mut object: Value) -> Arc<Value> {
        let resource_version = self.next_resource_version();
        let mut cleared = false;
        if let Some(metadata) = metadata_mut(&mut object) {
            metadata.insert("resourceVersion".to_owned(), Value::from(resource_version.to_string()));
            cleared = metadata.shift_remove("managedFields").is_some_and(|m| m == serde_json::json!([{}]));
        }
        let namespace = metadata_str(&object, "namespace").to_owned();
        let name = metadata_str(&object, "name").to_owned();
        if rt.behaviour == Behaviour::CustomResourceDefinition {
            self.types.retain(|_, t| t.behaviour != (Behaviour::Custom { crd: name.clone() }));
            for served in crd::served_types(&object) {
                self.register(served);
            }
        }
        let object = Arc::new(object);
        self.last_stored = Some((object.clone(), cleared));
        let type_key = rt.type_key();
        let previous = self
            .objects
            .entry(type_key.clone())
            .or_default()
            .insert((namespace.clone(), name), object.clone());
        let event_type = if previous.is_some() { EventType::Modified } else { EventType::Added };
        self.emit(Event {
            resource_version,
            event_type,
            type_key,
            namespace,
            object: object.clone(),
            previous,
        });
        object
    }

    /// Removes an object, delivering a DELETED event that carries a new resourceVersion; returns
    /// the object as it was last stored. Removing a namespace removes everything in it; removing a
    /// CRD unregisters its types and removes all their objects.
    pub(crate) fn remove(&mut self, type_key: &TypeKey, namespace: &str, name: &str) -> Option<Arc<Value>> {
        let removed = self.objects.get_mut(type_key)?.remove(&(namespace.to_owned(), name.to_owned()))?;
        if type_key.group.is_empty() && type_key.plural == "namespaces" {
            self.remove_contents(name);
        }
        if type_key.group == "apiextensions.k8s.io" && type_key.plural == "customresourcedefinitions" {
            self.types.retain(|_, t| t.behaviour != (Behaviour::Custom { crd: name.to_owned() }));
            if let Some(served) = crd::served_types(&removed).first() {
                let served_key = served.type_key();
                for object in self.list(&served_key, None) {
                    self.remove(
                        &served_key,
                        metadata_str(&object, "namespace"),
                        metadata_str(&object, "name"),
                    );
                }
            }
        }
        let resource_version = self.next_resource_version();
        let mut last = (*removed).clone();
        if let Some(metadata) = metadata_mut(&mut last) {
            metadata.insert("resourceVersion".to_owned(), Value::from(resource_version.to_string()));
        }
        self.emit(Event {
            resource_version,
            event_type: EventType::Deleted,
            type_key: type_key.clone(),
            namespace: namespace.to_owned(),
            object: Arc::new(last),
            previous: None,
        });
        Some(removed)
    }

    /// Removes every namespaced object in `namespace`.
    pub(crate) fn remove_contents(&mut self, namespace: &str) {
        let mut type_keys: Vec<TypeKey> = self.objects.keys().cloned().collect();
        type_keys.sort();
        for type_key in type_keys {
            for object in self.list(&type_key, Some(namespace)) {
                self.remove(&type_key, namespace, metadata_str(&object, "name"));
            }
        }
    }

    fn emit(&mut self, event: Event) {
        let event = Arc::new(event);
        self.subscribers.retain(|subscriber| {
            if subscriber.type_key != event.type_key
                || subscriber.namespace.as_ref().is_some_and(|namespace| *namespace != event.namespace)
            {
                return !subscriber.sender.is_closed();
            }
            subscriber.sender.send(event.clone()).is_ok()
        });
        let size = approximate_size(&event.object);
        self.history_bytes += size;
        self.history.push_back((size, event));
        while self.history.len() > HISTORY_LIMIT || self.history_bytes > HISTORY_BYTES {
            let Some((size, forgotten)) = self.history.pop_front() else { break };
            self.history_bytes -= size;
            self.history_floor = forgotten.resource_version;
        }
    }

    /// The recorded events of a type (and namespace) after `resource_version`, or `Err(floor)` if
    /// some of them were already forgotten.
    pub(crate) fn events_after(
        &self,
        resource_version: u64,
        type_key: &TypeKey,
        namespace: Option<&str>,
    ) -> Result<Vec<Arc<Event>>, u64> {
        if resource_version < self.history_floor {
            return Err(self.history_floor);
        }
        let start = self.history.partition_point(|(_, event)| event.resource_version <= resource_version);
        Ok(self
            .history
            .range(start..)
            .map(|(_, event)| event)
            .filter(|event| {
                event.type_key == *type_key && namespace.is_none_or(|namespace| event.namespace == namespace)
            })
            .cloned()
            .collect())
    }

    /// Delivers every later event of the type (and namespace) to `sender`.
    pub(crate) fn subscribe(
        &mut self,
        type_key: TypeKey,
        namespace: Option<String>,
        sender: UnboundedSender<Arc<Event>>,
    ) {
        self.subscribers.push(Subscriber { type_key, namespace, sender });
    }

    /// Forgets the whole event history, as an etcd compaction at the current revision does.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.history_bytes = 0;
        self.history_floor = self.resource_version;
    }
}
