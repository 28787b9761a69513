#!/usr/bin/env bash
# Static checks of the Docker setup; no Docker engine needed. Run by .ci/run.
#
# Usage: scripts/check-compose.sh
#
# 1. docker-compose.yml validates (`config -q`) with no .env at all (the defaults alone) and
#    with .env.example as the .env, in a clean environment (exported shell variables are
#    ignored, and so is a local .env).
# 2. The resolved file has the shape the README promises: the five services, health checks
#    on /readyz, migrate before the processor, nothing that prevents
#    `docker compose up --scale processor=3`, every setting of both binaries passed through,
#    no empty value except the optional webhook secrets (clap takes an empty variable as set,
#    and refuses it for a number or a duration), no unknown variable.
# 3. .env.example lists every environment variable of both binaries, and every variable
#    docker-compose.yml reads; the defaults in both files are the binaries' own.
# 4. A table in docs/ (docs/CONFIGURATION.md, or a command's own doc) has a row for every
#    one of those variables.
#    Every published port is bound to 127.0.0.1 unless a variable says otherwise, and the
#    health checks use the internal listeners (ingest's INGEST_METRICS_ADDR).
# 5. The Dockerfile's RUST_VERSION is at least the workspace's rust-version.
# 6. The `cluster` profile validates and has its three extra services.
#
# Uses `docker compose` (v2) when there is one, else Debian's `docker-compose` (v1), which it
# installs with apt-get when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'check-compose: %s\n' "$*" >&2; exit 1; }

compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "check-compose: installing docker-compose" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    compose=(docker-compose)
else
    die "neither \`docker compose\` nor \`docker-compose\` found (apt-get install docker-compose)"
fi

# A Python with PyYAML for the structural checks: docker-compose v1 depends on python3-yaml.
python=""
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
        python="$candidate"
        break
    fi
done
[[ -n "$python" ]] || die "no python3 with PyYAML (apt-get install python3-yaml)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/empty.env"

# Compose in a clean environment: only the given env file counts.
run_compose() {
    local env_file="$1"
    shift
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        "${compose[@]}" --env-file "$env_file" -f docker-compose.yml "$@"
}

for case in "empty.env:no .env" ".env.example:.env.example as .env"; do
    file="${case%%:*}"
    label="${case#*:}"
    [[ "$file" == empty.env ]] && file="$tmp/empty.env"
    run_compose "$file" config -q || die "docker-compose.yml does not validate ($label)"
    run_compose "$file" config > "$tmp/$(basename "$file").yml" 2>"$tmp/stderr" \
        || { cat "$tmp/stderr" >&2; die "cannot resolve docker-compose.yml ($label)"; }
    # Compose warns about variables that are used but unset; with every one defaulted there
    # should be none.
    if grep -qi 'variable is not set' "$tmp/stderr"; then
        cat "$tmp/stderr" >&2
        die "docker-compose.yml reads a variable without a default ($label)"
    fi
done

"$python" - "$tmp/empty.env.yml" "$tmp/.env.example.yml" <<'PY'
import glob
import re
import sys

import yaml

errors = []


def fail(message):
    errors.append(message)


def env_vars(paths):
    """The `env = "..."` names of clap arguments in these source files."""
    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            names.update(re.findall(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', f.read()))
    return names


shared = env_vars(["shared/src/config.rs"])
ingest_vars = shared | env_vars(glob.glob("ingest/src/**/*.rs", recursive=True))
processor_vars = shared | env_vars(glob.glob("processor/src/**/*.rs", recursive=True))
# Hidden, test-only settings: not for deployments.
test_only = {"PROCESSOR_TEST_HOOK"}
ingest_vars -= test_only
processor_vars -= test_only
# Settings Compose sets for a binary before that binary reads them: ingest's internal
# listener comes with the hardening of issue 12 (branch issue-12b). Drop a name from here once
# the source declares it.
announced = {"INGEST_METRICS_ADDR"} - ingest_vars
# Settings of operator commands, not of `processor run`: the Compose service need not pass
# them (`docker compose exec processor processor …` takes them from its command line).
operator_only = {"OPS_CONSOLE_ADDR", "OPS_TOKEN", "STRIPE_API_KEY"}
for needed in ("AMQP_URL", "LOG_FORMAT", "INGEST_ADDR", "DATABASE_URL", "PROCESSOR_METRICS_ADDR"):
    if needed not in ingest_vars | processor_vars:
        fail(f"found no clap `env = \"{needed}\"` in the sources: is the scan still right?")
everything = ingest_vars | processor_vars | {"RUST_LOG"} | announced
migrate_vars = {v for v in processor_vars if v.startswith("DATABASE_")} | {"LOG_FORMAT", "RUST_LOG"}

# The binaries' defaults, where the source spells them as a literal, a constant or a
# ValueEnum variant; others are not compared.
sources = {}
for path in ["shared/src/config.rs"] + glob.glob("ingest/src/**/*.rs", recursive=True) \
        + glob.glob("processor/src/**/*.rs", recursive=True) \
        + glob.glob("shared/src/**/*.rs", recursive=True):
    with open(path, encoding="utf-8") as f:
        sources[path] = f.read()
constants = {}
for text in sources.values():
    for name, value in re.findall(r"\bconst\s+([A-Z][A-Z0-9_]*)\s*:[^=]+=\s*([^;]+);", text):
        constants[name] = value.strip()


def resolve(expr):
    expr = expr.strip()
    if re.fullmatch(r'"(?:[^"\\]|\\.)*"', expr):
        return expr[1:-1]
    if re.fullmatch(r"[0-9_]+(\s*[*+]\s*[0-9_]+)*", expr):
        return str(eval(expr.replace("_", "")))  # digits and * + only
    last = expr.split("::")[-1]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", last) and last in constants:
        return resolve(constants[last])
    if re.fullmatch(r"[A-Z][A-Za-z0-9]*::[A-Z][A-Za-z0-9]*", expr):  # ValueEnum: kebab-case
        return re.sub(r"(?<!^)([A-Z])", r"-\1", last).lower()
    return None


defaults = {}  # variable -> the set of its defaults (a variable may serve two subcommands)
for text in sources.values():
    for attribute in re.findall(r"#\[arg\((.*?)\)\]", text, re.S):
        env = re.search(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', attribute)
        default = re.search(r'\bdefault_value_t\s*=\s*([^,]+?)\s*(?:,|$)', attribute) \
            or re.search(r'\bdefault_value\s*=\s*("(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_:]*)',
                         attribute)
        if env and default:
            value = resolve(default.group(1))
            if value is not None:
                defaults.setdefault(env.group(1), set()).add(value)
for needed in ("PROCESSOR_PREFETCH", "INGEST_CONFIRM_TIMEOUT", "AMQP_PREFIX", "LOG_FORMAT"):
    if needed not in defaults:
        fail(f"found no default for {needed} in the sources: is the scan still right?")


def same_default(name, value, where):
    if name in defaults and value not in defaults[name]:
        wanted = " or ".join(sorted(defaults[name]))
        fail(f"{where}: {name} defaults to `{value}`, the binary to `{wanted}`")


# --- .env.example ---------------------------------------------------------------------------
with open(".env.example", encoding="utf-8") as f:
    example = f.read()
listed = dict(re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", example, re.M))
for name in sorted(everything - set(listed)):
    fail(f".env.example does not list {name} (a setting of the binaries)")
# Listen addresses Compose fixes inside the containers: .env cannot change them there, and
# their lines show the binaries' defaults only for running without Compose (where a default
# moving to loopback is a change of the binary, not of this file).
fixed_by_compose = {"INGEST_ADDR", "INGEST_METRICS_ADDR", "PROCESSOR_METRICS_ADDR"}
for name, value in sorted(listed.items()):
    if name not in fixed_by_compose:
        same_default(name, value.strip(), ".env.example")
with open("docker-compose.yml", encoding="utf-8") as f:
    compose_text = re.sub(r"(^|\s)#.*$", "", f.read(), flags=re.M)  # not the comments
read_by_compose = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text))
for name in sorted(read_by_compose - set(listed)):
    fail(f".env.example does not list {name} (read by docker-compose.yml)")
for name, value in re.findall(r"^\s*([A-Z][A-Z0-9_]*):\s*\$\{\1:-([^}]*)\}\s*$", compose_text, re.M):
    same_default(name, value, "docker-compose.yml")

# --- docs/: a table row names every variable ---------------------------------------------------
# docs/CONFIGURATION.md has the binaries' common settings; a command with a doc of its own
# (docs/CONSOLE.md, docs/RECONCILE.md) may keep its settings' table there.
rows = []
for path in sorted(glob.glob("docs/*.md")):
    with open(path, encoding="utf-8") as f:
        rows += [line for line in f.read().splitlines() if line.startswith("|")]
for name in sorted(everything - {"RUST_LOG"}):
    # A row of its own, or a name in a row that groups several (`…_PAYMENT`-style shorthands
    # count for the STRIPE_LIVEMODE_<ENDPOINT> overrides).
    short = "`…_" + name.rsplit("_", 1)[-1] + "`" if name.startswith("STRIPE_LIVEMODE_") else None
    if not any(f"`{name}`" in row or (short and short in row) for row in rows):
        fail(f"no table row in docs/*.md (docs/CONFIGURATION.md) names {name}")

# --- the resolved compose file ----------------------------------------------------------------
secrets_may_be_empty = re.compile(r"^STRIPE_WEBHOOK_SECRET_[A-Z]+$")
# No value in the file: set only when set in the shell or .env (an empty value is refused).
pass_through = {"PROCESSOR_MAX_ATTEMPTS", "OPS_TOKEN", "OPS_READONLY_TOKEN"} | {
    v for v in everything if v.startswith("STRIPE_LIVEMODE_")
}


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def healthcheck_url(service):
    test = (service.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def condition(service, dependency):
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return None
    return (depends.get(dependency) or {}).get("condition")


def check(path, label):
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    services = config.get("services") or {}
    where = f"({label})"
    for name in ("rabbitmq", "postgres", "migrate", "ingest", "processor"):
        if name not in services:
            fail(f"no `{name}` service {where}")
            return
    rabbitmq, postgres = services["rabbitmq"], services["postgres"]
    migrate, ingest, processor = services["migrate"], services["ingest"], services["processor"]

    if not re.match(r"^rabbitmq:[^ ]*management", rabbitmq.get("image", "")):
        fail(f"rabbitmq must use the official image with the management plugin {where}")
    if "15672" not in str(rabbitmq.get("ports")):
        fail(f"rabbitmq does not publish the management port 15672 {where}")
    if not postgres.get("image", "").startswith("postgres:"):
        fail(f"postgres must use the official image {where}")
    volumes = config.get("volumes") or {}
    pg_volumes = [str(v.get("source") if isinstance(v, dict) else v).split(":")[0]
                  for v in postgres.get("volumes") or []]
    if not any(v in volumes for v in pg_volumes):
        fail(f"postgres keeps its data in no named volume {where}")
    for name in ("rabbitmq", "postgres", "ingest", "processor"):
        if not services[name].get("healthcheck"):
            fail(f"{name} has no health check {where}")
    for name in ("ingest", "processor"):
        if "/readyz" not in healthcheck_url(services[name]):
            fail(f"{name}'s health check does not use /readyz {where}")

    if migrate.get("command") != ["processor", "migrate"]:
        fail(f"migrate must run `processor migrate` {where}")
    if str(migrate.get("restart", "no")) not in ("no", "False", "false"):
        fail(f"migrate is a one-shot and must not restart {where}")
    if condition(migrate, "postgres") != "service_healthy":
        fail(f"migrate must wait for a healthy postgres {where}")
    if condition(ingest, "rabbitmq") != "service_healthy":
        fail(f"ingest must wait for a healthy rabbitmq {where}")
    if "8080" not in str(ingest.get("ports")):
        fail(f"ingest does not publish port 8080 {where}")
    # Safe by default: nothing is reachable from other machines unless asked for.
    for name, service in services.items():
        for port in service.get("ports") or []:
            host_ip = port.get("host_ip") if isinstance(port, dict) else \
                (str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else "")
            if host_ip != "127.0.0.1":
                fail(f"{name} publishes {port} beyond 127.0.0.1 by default {where}")
    if "9091/readyz" not in healthcheck_url(ingest):
        fail(f"ingest's health check must use its internal listener (port 9091) {where}")
    if environment(ingest).get("INGEST_METRICS_ADDR") != "0.0.0.0:9091":
        fail(f"ingest's INGEST_METRICS_ADDR must be 0.0.0.0:9091 in the container {where}")
    for name in ("ingest", "processor"):
        if environment(services[name]).get("STRIPE_LIVEMODE") != "false":
            fail(f"{name}: STRIPE_LIVEMODE must default to false {where}")
    if condition(processor, "migrate") != "service_completed_successfully":
        fail(f"processor must wait for migrate to complete successfully {where}")
    if condition(processor, "rabbitmq") != "service_healthy":
        fail(f"processor must wait for a healthy rabbitmq {where}")
    for key in ("container_name", "ports", "hostname"):
        if processor.get(key):
            fail(f"processor sets `{key}`, which breaks --scale processor=3 {where}")

    # The ops console's settings go to the `console` service (profile `console`), not to
    # every processor replica; `processor reconcile`'s own settings go to its service
    # (profile `reconcile`).
    console_only = {"OPS_TOKEN", "OPS_READONLY_TOKEN", "OPS_CONSOLE_ADDR",
                    "OPS_CONSOLE_INDEX_INTERVAL"}
    reconcile_only = {"STRIPE_API_KEY", "STRIPE_API_BASE", "STRIPE_API_RATE"}
    checked = [("migrate", migrate_vars), ("ingest", ingest_vars),
               ("processor", processor_vars - console_only - reconcile_only)]
    if "console" in services:
        checked.append(("console", console_only | {"DATABASE_URL", "AMQP_URL", "AMQP_PREFIX"}))
    for name, wanted in checked:
        env = environment(services[name])
        for var in sorted(wanted - set(env) - operator_only):
            fail(f"{name} does not pass {var} through {where}")
        for var, value in sorted(env.items()):
            if var not in everything:
                fail(f"{name} sets {var}, which no binary reads {where}")
            if value is None and var not in pass_through:
                fail(f"{name}: {var} has no value {where}")
            if value == "" and not secrets_may_be_empty.match(var):
                fail(f"{name}: {var} is empty; clap would take it as set and refuse it {where}")


check(sys.argv[1], "no .env")
check(sys.argv[2], ".env.example as .env")

# --- Dockerfile -------------------------------------------------------------------------------
def version(text):
    return tuple(int(part) for part in text.split("."))


with open("Dockerfile", encoding="utf-8") as f:
    dockerfile = f.read()
with open("Cargo.toml", encoding="utf-8") as f:
    cargo = f.read()
image_rust = re.search(r"^ARG RUST_VERSION=([0-9.]+)$", dockerfile, re.M)
msrv = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', cargo, re.M)
if not image_rust or not msrv:
    fail("cannot find ARG RUST_VERSION in Dockerfile or rust-version in Cargo.toml")
elif version(image_rust.group(1)) < version(msrv.group(1)):
    fail(f"Dockerfile RUST_VERSION {image_rust.group(1)} is older than the workspace's "
         f"rust-version {msrv.group(1)}")

for message in errors:
    print(f"check-compose: {message}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

# The `reconcile` profile validates too.
run_compose "$tmp/empty.env" --profile reconcile config -q \
    || die "docker-compose.yml does not validate with --profile reconcile"

# The `cluster` profile (three broker nodes) validates too.
run_compose "$tmp/empty.env" --profile cluster config -q \
    || die "docker-compose.yml does not validate with --profile cluster"
for node in rabbitmq-2 rabbitmq-3 rabbitmq-replicas; do
    run_compose "$tmp/empty.env" --profile cluster config --services | grep -qx "$node" \
        || die "the cluster profile has no $node service"
done

echo "check-compose: docker-compose.yml, .env.example and Dockerfile OK (${compose[*]})"
