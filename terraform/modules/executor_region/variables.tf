# One region's executor. The gunicorn defaults below are the ones in
# executor_service/gunicorn_config.py; the app reads the same values from the
# environment this module sets, and the scale rule is derived from them.

variable "region" {
  description = "Region name as the dispatcher knows it (ES_REGION, the key in the regions file), e.g. us-east."
  type        = string

  # Azure's rule for container app and environment names: lowercase
  # letters, digits and single hyphens, starting with a letter, not ending
  # with a hyphen. 16 characters keep "cae-<prefix>-<region>" within 32.
  validation {
    condition     = can(regex("^[a-z][a-z0-9]*(-[a-z0-9]+)*$", var.region)) && length(var.region) <= 16
    error_message = "region must be lowercase letters, digits and single hyphens, start with a letter, not end with a hyphen, at most 16 characters (it is part of Azure resource names)."
  }
}

variable "location" {
  description = "Azure location of this region, e.g. eastus."
  type        = string
}

variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}

variable "image" {
  description = "Full image reference, registry/repository:tag."
  type        = string
}

variable "registry_id" {
  description = "Resource ID of the container registry the app pulls from (AcrPull is granted on it)."
  type        = string
}

variable "registry_login_server" {
  description = "Login server of that registry, e.g. myacr.azurecr.io."
  type        = string
}

variable "api_key" {
  description = "The key the dispatcher presents to this executor (tenant 'dispatcher'). Stored as a container app secret."
  type        = string
  sensitive   = true
}

variable "sentry_dsn" {
  description = "Sentry DSN, stored as a container app secret; empty turns Sentry off. Ignored when sentry_dsn_key_vault_secret_id is set."
  type        = string
  default     = ""
  sensitive   = true
}

variable "sentry_dsn_key_vault_secret_id" {
  description = "Versionless ID of a Key Vault secret holding the Sentry DSN, read by the app's identity (needs key_vault_id)."
  type        = string
  default     = null
}

variable "key_vault_id" {
  description = "Key Vault holding referenced secrets; the app's identity gets 'Key Vault Secrets User' on it."
  type        = string
  default     = null
}

variable "sentry_environment" {
  description = "ES_SENTRY_ENVIRONMENT."
  type        = string
  default     = "production"
}

variable "catalog_toml" {
  description = "Model catalog (TOML) mounted as a file and named by ES_CATALOG; null serves the catalog built into the image."
  type        = string
  default     = null
}

variable "provider_secrets" {
  description = "Environment variables that hold model-provider credentials (name => value), e.g. OPENAI_API_KEY; each becomes a container app secret."
  type        = map(string)
  default     = {}
  sensitive   = true

  # Each becomes the secret lower(replace(NAME, "_", "-")): it must be a valid
  # secret name and not one of this module's own (api-keys, sentry-dsn,
  # catalog-toml), and the env var must not be one this module sets.
  validation {
    condition     = alltrue([for name in keys(var.provider_secrets) : can(regex("^[A-Z]([A-Z0-9_]*[A-Z0-9])?$", name)) && !contains(["api-keys", "sentry-dsn", "catalog-toml"], lower(replace(name, "_", "-"))) && !contains(["PORT", "WEB_CONCURRENCY", "SENTRY_DSN"], name) && !startswith(name, "ES_") && !startswith(name, "GUNICORN_")])
    error_message = "provider_secrets names must be environment variable names (A-Z, 0-9, _, not ending with _) and must not be API_KEYS, SENTRY_DSN, CATALOG_TOML, PORT, WEB_CONCURRENCY or start with ES_ or GUNICORN_ (names this module uses)."
  }
}

variable "models" {
  description = "Models this region serves (must be in its catalog); reported to the dispatcher's regions file."
  type        = list(string)
}

variable "port" {
  description = "Port gunicorn binds (PORT); ingress target port and probe port."
  type        = number
  default     = 8000
}

variable "workers" {
  description = "Gunicorn worker processes (WEB_CONCURRENCY)."
  type        = number
  default     = 4

  validation {
    condition     = var.workers >= 1 && floor(var.workers) == var.workers
    error_message = "workers must be a whole number >= 1."
  }
}

variable "threads" {
  description = "Threads per gthread worker (GUNICORN_THREADS): model calls one worker runs at once."
  type        = number
  default     = 2

  validation {
    condition     = var.threads >= 1 && floor(var.threads) == var.threads
    error_message = "threads must be a whole number >= 1."
  }
}

variable "worker_class" {
  description = "GUNICORN_WORKER_CLASS: gthread (CPU-bound local model) or gevent (I/O-bound remote providers)."
  type        = string
  default     = "gthread"

  validation {
    condition     = contains(["gthread", "gevent"], var.worker_class)
    error_message = "worker_class must be gthread or gevent."
  }
}

variable "gevent_max_in_flight" {
  description = "Model calls in flight per gevent worker (ES_MAX_IN_FLIGHT); gthread uses threads instead."
  type        = number
  default     = 250 # executor_service/gunicorn_config.py GEVENT_MAX_IN_FLIGHT
}

variable "timeout_cap_s" {
  description = "ES_TIMEOUT_CAP_S: server-side cap on one model call (504 beyond it); below worker_timeout_s. The probes' timeout is derived from it."
  type        = number
  default     = 50 # executor_service/config.py Settings.timeout_cap_s
}

variable "model_latency_s" {
  description = "Mean time of one /execute call under full load (seconds), measured (executor_request_seconds); the scale rule's target is derived from it."
  type        = number
  default     = 2

  validation {
    condition     = var.model_latency_s > 0
    error_message = "model_latency_s must be > 0."
  }
}

variable "scale_utilisation" {
  description = "Fraction of a replica's throughput (C / latency) at which the scale rule adds a replica; the rest is headroom while a new replica starts."
  type        = number
  default     = 0.8

  validation {
    condition     = var.scale_utilisation > 0 && var.scale_utilisation <= 1
    error_message = "scale_utilisation must be in (0, 1]."
  }
}

variable "role_propagation_wait_s" {
  description = "Seconds to wait after the role assignments before creating the app (Azure: propagation takes up to a few minutes)."
  type        = number
  default     = 300
}

variable "worker_timeout_s" {
  description = "GUNICORN_TIMEOUT: a worker silent this long is killed and restarted."
  type        = number
  default     = 60
}

variable "graceful_timeout_s" {
  description = "GUNICORN_GRACEFUL_TIMEOUT: seconds in-flight calls get to finish after SIGTERM."
  type        = number
  default     = 30
}

variable "cpu" {
  description = "vCPU per replica (Consumption: 0.25 to 2, in steps of 0.25)."
  type        = number
  default     = 2
}

variable "memory_gib" {
  description = "Memory per replica in GiB; the Consumption profile requires twice the vCPU."
  type        = number
  default     = 4
}

variable "min_replicas" {
  description = "Replicas kept running; 0 scales to zero when idle (cold start on the next call)."
  type        = number
  default     = 1
}

variable "max_replicas" {
  description = "Upper bound of the HTTP scale rule."
  type        = number
  default     = 10

  validation {
    condition     = var.max_replicas >= 1 && var.max_replicas <= 300
    error_message = "max_replicas must be between 1 and 300."
  }
}

variable "allowed_cidrs" {
  description = "If not empty, only these source ranges (e.g. the dispatcher's outbound IPs) may reach the ingress."
  type        = list(string)
  default     = []
}

variable "log_retention_days" {
  description = "Log Analytics retention (30 to 730 days, PerGB2018)."
  type        = number
  default     = 30

  validation {
    condition     = var.log_retention_days >= 30 && var.log_retention_days <= 730 && floor(var.log_retention_days) == var.log_retention_days
    error_message = "log_retention_days must be a whole number from 30 to 730."
  }
}
