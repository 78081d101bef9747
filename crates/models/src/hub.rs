//! Fetching weights from the Hugging Face hub, cache first (works offline).

use crate::{ModelError, ModelName};
use hf_hub::{Cache, Repo};
use std::path::{Path, PathBuf};

/// The hub repository wick loads ResNet18 weights from (timm names = torchvision names).
pub const RESNET18_REPO: &str = "timm/resnet18.a1_in1k";
/// The weights file within [`RESNET18_REPO`] (and every repository of [`HUB_REPOS`]).
pub const RESNET18_FILE: &str = "model.safetensors";
/// The hub repositories of the models that have one: timm's ResNets, whose
/// parameter names are torchvision's (`conv1`, `layer1.0.bn2`, `fc`, ...).
pub const HUB_REPOS: [(ModelName, &str); 3] = [
    (ModelName::Resnet18, RESNET18_REPO),
    (ModelName::Resnet34, "timm/resnet34.a1_in1k"),
    (ModelName::Resnet50, "timm/resnet50.a1_in1k"),
];

/// Where to look and whether the network may be used.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Cache directory; `None` = `HF_HOME`/`~/.cache/huggingface/hub` as `huggingface_hub` uses.
    pub cache_dir: Option<PathBuf>,
    /// Never contact the hub (also on when `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

/// Path of `file` in model repository `repo`: from the local cache if it is
/// there, otherwise downloaded into it unless offline.
pub fn fetch(repo: &str, file: &str, options: &HubOptions) -> Result<PathBuf, ModelError> {
    let cache = match &options.cache_dir {
        Some(dir) => Cache::new(dir.clone()),
        None => Cache::from_env(),
    };
    if let Some(path) = cache.repo(Repo::model(repo.to_string())).get(file) {
        tracing::debug!(repo, file, path = %path.display(), "found in Hugging Face cache");
        return Ok(path);
    }
    let offline_env = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if options.offline || offline_env {
        return Err(ModelError::NotInCache {
            repo: repo.to_string(),
            file: file.to_string(),
            cache: cache.path().clone(),
        });
    }
    let hub_error = |message: String| ModelError::Hub {
        repo: repo.to_string(),
        file: file.to_string(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|e| hub_error(e.to_string()))
}

/// The timm ResNet18 weights file ([`RESNET18_REPO`]), cache first.
pub fn resnet18_weights(options: &HubOptions) -> Result<PathBuf, ModelError> {
    weights(ModelName::Resnet18, options)
}

/// The hub weights file of `model` ([`HUB_REPOS`]), cache first; a typed
/// error for a model without one.
pub fn weights(model: ModelName, options: &HubOptions) -> Result<PathBuf, ModelError> {
    let repo = HUB_REPOS
        .iter()
        .find(|(name, _)| *name == model)
        .map(|(_, repo)| *repo)
        .ok_or_else(|| ModelError::NoHubWeights {
            model: model.as_str().to_string(),
            known: HUB_REPOS.iter().map(|(name, _)| name.as_str()).collect(),
        })?;
    fetch(repo, RESNET18_FILE, options)
}

/// Places `source` into a Hugging Face cache at `cache_dir` as `file` of
/// model `repo` at revision `main` (commit id `commit`), with the same
/// layout `huggingface_hub` writes: `models--{org}--{name}/refs/main` and
/// `snapshots/{commit}/{file}`. Used to seed offline machines and in tests.
pub fn seed_cache(
    cache_dir: &Path,
    repo: &str,
    commit: &str,
    file: &str,
    source: &Path,
) -> Result<PathBuf, ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let repo_dir = cache_dir.join(Repo::model(repo.to_string()).folder_name());
    let refs = repo_dir.join("refs");
    std::fs::create_dir_all(&refs).map_err(io(&refs))?;
    std::fs::write(refs.join("main"), commit).map_err(io(&refs))?;
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).map_err(io(&snapshot))?;
    let target = snapshot.join(file);
    std::fs::copy(source, &target).map_err(io(&target))?;
    Ok(target)
}
