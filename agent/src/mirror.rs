//! The mesh, followed through the API server as well as through the pod's
//! ConfigMap volume.
//!
//! Kubernetes refreshes a mounted ConfigMap only when the kubelet next syncs
//! the pod: a minute or more after the operator publishes a new epoch. The
//! survivors of a lost node would wait that long before going on. So a pod's
//! worker keeps its own copy of the mesh file, which its ranks and its
//! supervisor follow: the volume's mesh, or the API server's (one watch of the
//! job's mesh ConfigMap, which the job's worker ServiceAccount may read) when
//! that one is of a newer epoch. At the same epoch the volume's copy stands.
//! Without the API server (no credentials, no network), the copy follows the
//! volume alone, as before.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, WatchEvent, WatchParams};

use crate::ApiLink;

/// A mesh document and its epoch.
type Versioned = (u64, String);

/// The epoch of a mesh document, when it is one.
fn epoch_of(text: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()?
        .get("epoch")?
        .as_u64()
}

/// What the copy should hold: the API server's mesh when its epoch is newer
/// than the volume's, else the volume's.
pub fn newest<'a>(volume: Option<&'a Versioned>, api: Option<&'a Versioned>) -> Option<&'a str> {
    match (volume, api) {
        (Some(v), Some(a)) if a.0 > v.0 => Some(a.1.as_str()),
        (Some(v), _) => Some(v.1.as_str()),
        (None, Some(a)) => Some(a.1.as_str()),
        (None, None) => None,
    }
}

#[derive(Default)]
struct Sources {
    volume: Option<Versioned>,
    api: Option<Versioned>,
    written: Option<String>,
}

/// Keeps `copy` equal to the newest mesh of the volume file and the API
/// server's ConfigMap (see the module documentation).
#[derive(Debug)]
pub struct MeshMirror {
    copy: PathBuf,
}

impl MeshMirror {
    /// Starts following `volume` (every second) and, when `config_map`
    /// (namespace, name) is given, that ConfigMap's `mesh.json` through the
    /// API server over `link`; returns once the copy holds the volume's mesh
    /// (or at once, when the volume has none yet: the copy follows as soon
    /// as it has).
    pub fn start(
        volume: PathBuf,
        copy: PathBuf,
        config_map: Option<(&ApiLink, String, String)>,
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> std::io::Result<MeshMirror> {
        if let Some(dir) = copy.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let sources = Arc::new(Mutex::new(Sources::default()));
        let log = Arc::new(log);
        // The volume, now and then every second (`WEFT_MESH_POLL_MS`
        // milliseconds where set: tests whose steps take less).
        sync_volume(&volume, &copy, &sources)?;
        let poll = std::env::var("WEFT_MESH_POLL_MS")
            .ok()
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map_or(Duration::from_secs(1), Duration::from_millis);
        {
            let (copy, sources, log) = (copy.clone(), sources.clone(), log.clone());
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(poll);
                    if let Err(e) = sync_volume(&volume, &copy, &sources) {
                        log(&format!("mesh copy {}: {e}", copy.display()));
                    }
                }
            });
        }
        if let Some((link, namespace, name)) = config_map {
            let (copy, sources, client) = (copy.clone(), sources.clone(), link.client());
            link.spawn(async move {
                follow_api(client, &namespace, &name, &copy, &sources, &*log).await
            });
        }
        Ok(MeshMirror { copy })
    }

    /// The file that holds the newest mesh.
    pub fn path(&self) -> &Path {
        &self.copy
    }
}

fn sync_volume(volume: &Path, copy: &Path, sources: &Mutex<Sources>) -> std::io::Result<()> {
    // A volume mid-swap (Kubernetes replaces the files by a symlink flip) or
    // not yet mounted reads as nothing new.
    let Ok(text) = std::fs::read_to_string(volume) else {
        return Ok(());
    };
    let Some(epoch) = epoch_of(&text) else {
        return Ok(());
    };
    let mut s = sources.lock().unwrap_or_else(|e| e.into_inner());
    s.volume = Some((epoch, text));
    publish(copy, &mut s)
}

/// Writes the newest mesh to `copy` when it changed: to a file beside it,
/// then renamed over it, so a reader sees the old mesh or the new, whole.
fn publish(copy: &Path, s: &mut Sources) -> std::io::Result<()> {
    let Some(text) = newest(s.volume.as_ref(), s.api.as_ref()).map(str::to_string) else {
        return Ok(());
    };
    if s.written.as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    let partial = copy.with_extension("json.partial");
    std::fs::write(&partial, &text)?;
    std::fs::rename(&partial, copy)?;
    s.written = Some(text);
    Ok(())
}

/// Watches ConfigMap `name` in `namespace` for ever, taking each `mesh.json`
/// it carries; reconnects after a pause when the watch ends or fails.
async fn follow_api(
    client: kube::Client,
    namespace: &str,
    name: &str,
    copy: &Path,
    sources: &Mutex<Sources>,
    log: &(dyn Fn(&str) + Send + Sync),
) {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let take = |cm: &ConfigMap| {
        let Some(text) = cm.data.as_ref().and_then(|d| d.get("mesh.json")) else {
            return;
        };
        let Some(epoch) = epoch_of(text) else {
            return;
        };
        let mut s = sources.lock().unwrap_or_else(|e| e.into_inner());
        s.api = Some((epoch, text.clone()));
        if let Err(e) = publish(copy, &mut s) {
            log(&format!("mesh copy {}: {e}", copy.display()));
        }
    };
    let mut warned = false;
    loop {
        let watched = async {
            let current = api.get_opt(name).await?;
            let version = current
                .as_ref()
                .and_then(|cm| cm.resource_version())
                .unwrap_or_else(|| "0".to_string());
            if let Some(cm) = &current {
                take(cm);
            }
            let params = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(290);
            let mut events = api.watch(&params, &version).await?.boxed();
            while let Some(event) = events.next().await {
                match event? {
                    WatchEvent::Added(cm) | WatchEvent::Modified(cm) => take(&cm),
                    WatchEvent::Error(e) => return Err(kube::Error::Api(e)),
                    WatchEvent::Deleted(_) | WatchEvent::Bookmark(_) => {}
                }
            }
            Ok::<(), kube::Error>(())
        }
        .await;
        if let Err(e) = watched {
            if !warned {
                log(&format!(
                    "watching ConfigMap {namespace}/{name} failed ({e}); the mesh is followed through its volume until it works"
                ));
                warned = true;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_servers_mesh_stands_only_when_newer() {
        let v1 = (1, "v1".to_string());
        let a1 = (1, "a1".to_string());
        let a2 = (2, "a2".to_string());
        assert_eq!(newest(Some(&v1), Some(&a1)), Some("v1"));
        assert_eq!(newest(Some(&v1), Some(&a2)), Some("a2"));
        assert_eq!(newest(Some(&v1), None), Some("v1"));
        assert_eq!(newest(None, Some(&a1)), Some("a1"));
        assert_eq!(newest(None, None), None);
    }

    #[test]
    fn the_copy_follows_the_volume_and_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("weft-mirror-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (volume, copy) = (dir.join("volume.json"), dir.join("copy/mesh.json"));
        std::fs::write(&volume, r#"{"epoch": 3}"#).unwrap();
        let mirror = MeshMirror::start(volume.clone(), copy.clone(), None, |_| {}).unwrap();
        assert_eq!(
            std::fs::read_to_string(mirror.path()).unwrap(),
            r#"{"epoch": 3}"#
        );
        std::fs::write(&volume, r#"{"epoch": 4}"#).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&copy).unwrap() != r#"{"epoch": 4}"# {
            assert!(
                std::time::Instant::now() < deadline,
                "the copy did not follow"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // An API mesh of a newer epoch wins over the volume's; an older one does not.
        let sources = Mutex::new(Sources::default());
        sync_volume(&volume, &copy, &sources).unwrap();
        {
            let mut s = sources.lock().unwrap();
            s.api = Some((5, r#"{"epoch": 5}"#.to_string()));
            publish(&copy, &mut s).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), r#"{"epoch": 5}"#);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
