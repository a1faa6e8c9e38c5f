# Sourced by the scripts beside it: where the cache lives, buildah's settings,
# and the tools installed when missing.

# Outside the repository, so a fresh clone reuses the base (and buildah's own
# layer store under /var/lib/containers keeps the build layers).
if [[ -z "${ES_IMAGE_CACHE:-}" ]]; then
  if [[ -w /var/cache ]]; then ES_IMAGE_CACHE=/var/cache/executor-service
  else ES_IMAGE_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/executor-service"; fi
fi
export ES_IMAGE_CACHE
mkdir -p "$ES_IMAGE_CACHE"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

# The local base image's name; the tag is a hash of the recipe (make-base.sh and
# its package list), so changing the recipe makes a new base.
base_tag() {
  echo "localhost/executor-service-base:bookworm-$(sha256sum < "$here/make-base.sh" | cut -c1-12)"
}

need_tools() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) && return 0
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "make image: ${missing[*]} missing, and apt-get cannot install them here (needs root on Debian)" >&2
    return 1
  fi
  echo "== apt-get install ${missing[*]}"
  apt-get update -qq
  # With the recommended packages, as tried here (debootstrap wants Debian's keyring).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
