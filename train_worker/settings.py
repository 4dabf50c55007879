"""The one configuration model: `ENGRAIN_*` environment variables over an optional TOML file.

Every process (MCP server, worker, model host, CLI) reads its settings here, and every path under
`$ENGRAIN_HOME` is derived by `Layout`, so no two processes can disagree about where a file lives.
"""

from __future__ import annotations

import os
import stat
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

HostController = Literal["auto", "lease", "systemd", "http", "none"]


def default_home() -> Path:
    """`$XDG_DATA_HOME/engrain`, falling back to `~/.local/share/engrain`."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "engrain"


def config_file() -> Path:
    """The optional TOML file: `$ENGRAIN_CONFIG`, else `$ENGRAIN_HOME/config.toml`."""
    explicit = os.environ.get("ENGRAIN_CONFIG")
    if explicit:
        return Path(explicit)
    home = os.environ.get("ENGRAIN_HOME")
    return (Path(home) if home else default_home()) / "config.toml"


class Settings(BaseSettings):
    """Operator settings. Per-kernel training settings live with each kernel in the store."""

    model_config = SettingsConfigDict(env_prefix="ENGRAIN_", extra="forbid", validate_default=True)

    home: Path = Field(default_factory=default_home, description="Root of every file engrain writes.")
    base_model: str | None = Field(
        default=None, description="Local Hugging Face model directory; unset means the embedded SmolLM2."
    )
    token: SecretStr | None = Field(
        default=None, description="Bearer token for MCP-over-HTTP and the host's admin endpoints."
    )
    mcp_port: int = Field(default=8764, ge=1, le=65535, description="Port of `engrain serve --http`.")
    host_address: str = "127.0.0.1"
    host_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Loopback port of the model host. 0: a free port picked at start; either way the host "
        "records it in $ENGRAIN_HOME/host.json, where clients find it. A set port that is taken is an error.",
    )
    host_backend: Literal["auto", "transformers", "llama.cpp"] = Field(
        default="auto",
        description="The host's inference backend: llama.cpp (fast on a CPU; needs the `fast` extra and a GGUF "
        "base), transformers (fp32 reference, GPU), or auto (llama.cpp when it can serve the base, else transformers).",
    )
    host_gguf_type: Literal["as-shipped", "f16", "f32"] = Field(
        default="f16",
        description="Weights the llama.cpp backend serves: an f16 copy of the GGUF file made once (the default: "
        "about 0.8x the speed of the shipped file, and 96% of its greedy answers those of the fp32 model the "
        "worker trains and evaluates), the file as shipped (the embedded model's is Q4_1: faster, but 46% of its "
        "answers differ from what the gates judged), or an f32 copy (slowest, and exact: with an f32 KV cache and "
        "no flash attention, every greedy answer is the fp32 model's). "
        "Figures: docs/benchmarks.md, Serving.",
    )
    host_threads: int | None = Field(
        default=None,
        ge=1,
        description="Compute threads of the host's backend; unset: ENGRAIN_TORCH_THREADS, else one per core.",
    )
    host_max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest request body the host reads.")
    host_max_prompt_tokens: int = Field(
        default=4096, ge=16, description="Longest prompt (the whole conversation, formatted) the host accepts."
    )
    host_controller: HostController = Field(
        default="auto",
        description="How the worker frees the host's memory besides its training lease: lease (the host "
        "unloads itself while the lease is held), systemd (also stops the unit, which frees GPU memory "
        "for certain), http (also calls the host's admin unload/reload), none (leaves the host alone, no "
        "lease), or auto (systemd when the unit is installed, else lease).",
    )
    host_unload_wait_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="How long the worker waits for the host to report itself unloaded before it loads the "
        "model anyway (with a warning); a busy host finishes its answers first.",
    )
    systemd_user: bool = Field(default=True, description="Use `systemctl --user` for the host unit.")
    embedded_services: bool = Field(
        default=True, description="`engrain serve` starts the host and watcher when they are not running."
    )
    keep_versions: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="Newest adapter versions kept per kernel; the deployed one, its rollback target and "
        "converged versions are kept on top of these.",
    )
    max_resume_attempts: int = Field(default=3, ge=1, le=1000, description="Restarts of a run whose worker died.")
    max_prompt_chars: int = Field(default=8000, ge=1, le=10_000_000)
    max_response_chars: int = Field(default=16000, ge=1, le=10_000_000)
    max_system_chars: int = Field(default=4000, ge=1, le=10_000_000)
    max_batch_items: int = Field(default=1000, ge=1, le=1_000_000)
    torch_threads: int | None = Field(default=None, ge=1, le=4096, description="Unset: one per physical core.")
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu",
        description="Where the worker trains and the host serves: cpu, cuda (an error when CUDA is not "
        "available), or auto (cuda when torch.cuda.is_available(), else cpu). fp32 on either.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments win, then the environment, then the TOML file.
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)

    @cached_property
    def layout(self) -> Layout:
        return Layout(self.home)


class Layout:
    """Where each file under `$ENGRAIN_HOME` lives (the design's Files section)."""

    def __init__(self, home: Path) -> None:
        self.home = home.expanduser().resolve()

    @property
    def db(self) -> Path:
        return self.home / "engrain.db"

    @property
    def requests(self) -> Path:
        return self.home / "requests"

    @property
    def pending(self) -> Path:
        return self.requests / "pending.json"

    @property
    def results(self) -> Path:
        """Finished runs' `result-<run_id>.json` files, waiting for the server to record them."""
        return self.requests / "results"

    @property
    def active(self) -> Path:
        """One empty marker per claimed run without a result: what systemd and the watcher resume."""
        return self.requests / "active"

    @property
    def archive(self) -> Path:
        return self.requests / "archive"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    @property
    def kernels(self) -> Path:
        return self.home / "kernels"

    def kernel_dir(self, name: str) -> Path:
        return self.kernels / name

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def cache(self) -> Path:
        """Per-base-model baselines (anchor answers, probe results, reference perplexity)."""
        return self.home / "cache"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def token_file(self) -> Path:
        return self.home / "token"

    @property
    def lease(self) -> Path:
        """`TrainingLease`: present while a worker needs the model host's memory."""
        return self.locks / "training.lease"

    @property
    def host_endpoint(self) -> Path:
        """`HostEndpoint`: where this home's model host listens."""
        return self.home / "host.json"

    @property
    def estop(self) -> Path:
        """While this file exists, no run starts, automatic or manual."""
        return self.home / "ESTOP"

    def ensure(self) -> None:
        """Create the home and its folders private (0700) whatever the umask; refuse another user's home."""
        check_home(self.home)
        for d in (
            self.requests,
            self.active,
            self.results,
            self.archive,
            self.quarantine,
            self.runs,
            self.kernels,
            self.models,
            self.locks,
            self.logs,
        ):
            private_dir(d)


class HomeError(Exception):
    """`$ENGRAIN_HOME` cannot be used safely."""


def private_dir(path: Path) -> None:
    """`mkdir -p` with mode 0700 for the leaf, tightened if it already exists looser."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def check_home(home: Path) -> None:
    """The home exists (created 0700), is a directory owned by this user, and is not open to others."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = home.stat()
    except OSError as exc:
        raise HomeError(f"cannot create ENGRAIN_HOME {home}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise HomeError(f"ENGRAIN_HOME {home} is not a directory; point ENGRAIN_HOME at a directory of your own")
    me = os.geteuid()
    if st.st_uid != me:
        raise HomeError(
            f"ENGRAIN_HOME {home} belongs to uid {st.st_uid}, not to this user (uid {me}); engrain refuses a home "
            "another user controls (they could read the kernels or plant files). Point ENGRAIN_HOME at a "
            "directory of your own."
        )
    if st.st_mode & 0o077:
        home.chmod(0o700)  # an older engrain, or the umask, left it open to others
