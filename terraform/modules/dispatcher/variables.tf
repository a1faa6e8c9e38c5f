variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
}

variable "location" {
  description = "Azure location of the dispatcher and its database."
  type        = string
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}

variable "image" {
  description = "Full image reference (the executor image; it carries the dispatcher too)."
  type        = string
}

variable "registry_id" {
  description = "Resource ID of the container registry (AcrPull is granted on it)."
  type        = string
}

variable "registry_login_server" {
  description = "Login server of that registry."
  type        = string
}

variable "command" {
  description = "Command that starts the dispatcher (HTTP API under gunicorn plus one worker per region); it must bind 0.0.0.0 and var.port."
  type        = list(string)
  default     = ["executor-service", "dispatcher", "--host", "0.0.0.0", "--port", "8100"]
}

variable "port" {
  description = "Port the dispatcher's API listens on (the --port of its command)."
  type        = number
  default     = 8100
}

variable "shutdown_grace_s" {
  description = "ES_SHUTDOWN_GRACE_S: after SIGTERM, seconds calls in flight get before their leases are released."
  type        = number
  default     = 30
}

variable "cpu" {
  description = "vCPU per replica."
  type        = number
  default     = 1
}

variable "memory_gib" {
  description = "Memory per replica in GiB (twice cpu)."
  type        = number
  default     = 2
}

variable "min_replicas" {
  description = "Dispatchers always running (at least 1: they claim work without being called)."
  type        = number
  default     = 1
}

variable "max_replicas" {
  description = "Dispatchers at most; they share the database, which enforces every region's concurrency."
  type        = number
  default     = 2
}

variable "regions_toml" {
  description = "The regions file (ES_REGIONS_FILE), rendered from the executors' outputs."
  type        = string
}

variable "region_api_keys" {
  description = "Each executor's key, by the environment variable the regions file names for it."
  type        = map(string)
  sensitive   = true
}

variable "sentry_dsn" {
  description = "Sentry DSN; empty turns Sentry off."
  type        = string
  default     = ""
  sensitive   = true
}

variable "postgres_sku" {
  description = "PostgreSQL Flexible Server SKU, e.g. B_Standard_B1ms (trial) or GP_Standard_D2ds_v5."
  type        = string
  default     = "GP_Standard_D2ds_v5"
}

variable "postgres_version" {
  description = "PostgreSQL major version."
  type        = string
  default     = "16"
}

variable "postgres_storage_mb" {
  description = "Database storage in MB."
  type        = number
  default     = 32768
}

variable "postgres_zone" {
  description = "Availability zone of the database server; null lets Azure choose (required in locations without zones)."
  type        = string
  default     = null

  validation {
    condition     = var.postgres_zone == null || contains(["1", "2", "3"], coalesce(var.postgres_zone, "none"))
    error_message = "postgres_zone must be null, \"1\", \"2\" or \"3\"."
  }
}

variable "vnet_address_space" {
  description = "Address space of the dispatcher's private network: a /23 for the Container Apps environment and a /24 for the database."
  type        = string
  default     = "10.40.0.0/22"
}

variable "log_retention_days" {
  description = "Log Analytics retention (30 to 730 days)."
  type        = number
  default     = 30

  validation {
    condition     = var.log_retention_days >= 30 && var.log_retention_days <= 730 && floor(var.log_retention_days) == var.log_retention_days
    error_message = "log_retention_days must be a whole number from 30 to 730."
  }
}

variable "role_propagation_wait_s" {
  description = "Seconds to wait after the AcrPull assignment before creating the app."
  type        = number
  default     = 300
}
