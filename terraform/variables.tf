variable "subscription_id" {
  description = "Azure subscription; null takes ARM_SUBSCRIPTION_ID. azurerm 4 requires one of the two: it no longer falls back to the Azure CLI's current subscription."
  type        = string
  default     = null

  validation {
    condition     = var.subscription_id == null || can(regex("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", var.subscription_id))
    error_message = "subscription_id must be a subscription GUID (az account show --query id -o tsv)."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name: lowercase letters and digits, 2 to 10 characters."
  type        = string
  default     = "execsvc"

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,9}$", var.name_prefix))
    error_message = "name_prefix must be 2 to 10 lowercase letters or digits, starting with a letter."
  }
}

variable "registry_location" {
  description = "Home location of the container registry (and of the shared resource group); every other region location gets a geo-replica. Compared with the regions' locations case- and space-insensitively (\"East US\" is eastus)."
  type        = string
  default     = "eastus"
}

variable "registry_zone_redundancy" {
  description = "Zone-redundant registry and replicas. Only locations with availability zones accept it: set false if registry_location or any region's location has none."
  type        = bool
  default     = true
}

variable "role_propagation_wait_s" {
  description = "Seconds each region (and the dispatcher) waits after its role assignments before its container app is created: Azure takes up to a few minutes to propagate a new assignment."
  type        = number
  default     = 300

  validation {
    condition     = var.role_propagation_wait_s >= 0 && var.role_propagation_wait_s <= 1800
    error_message = "role_propagation_wait_s must be between 0 and 1800."
  }
}

variable "image_repository" {
  description = "Repository of the executor image in the registry."
  type        = string
  default     = "executor-service"
}

variable "image_tag" {
  description = "Image tag to run, e.g. a release version or a git SHA. Changing it rolls out a new revision in every region."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag)) && var.image_tag != "latest"
    error_message = "image_tag must be a valid, immutable Docker tag (not 'latest')."
  }
}

variable "regions" {
  description = <<-EOT
    One executor per entry: region name (as the dispatcher knows it) => settings.
    location: Azure location. models: what the region serves (must be in its catalog).
    The rest are optional: replicas, gunicorn workers/threads/worker class, vCPU and
    memory per replica, a region-specific catalog, the dispatcher's concurrency
    for the region (default: calls per replica x max_replicas), and the measured
    model latency under load that the scale rule's target is derived from.
  EOT
  type = map(object({
    location               = string
    models                 = list(string)
    min_replicas           = optional(number, 1)
    max_replicas           = optional(number, 10)
    workers                = optional(number, 4)
    threads                = optional(number, 2)
    worker_class           = optional(string, "gthread")
    cpu                    = optional(number, 2)
    memory_gib             = optional(number, 4)
    catalog_toml           = optional(string)
    dispatcher_concurrency = optional(number)
    model_latency_s        = optional(number, 2)
  }))
  default = {
    us-east = {
      location = "eastus"
      models   = ["smollm2-135m"]
    }
    eu-west = {
      location = "westeurope"
      models   = ["smollm2-135m"]
    }
    asia-pacific = {
      location = "southeastasia"
      models   = ["smollm2-135m"]
    }
  }

  # The name is part of Azure resource names (ca-<prefix>-<region>): Azure
  # refuses a trailing hyphen and a double hyphen there.
  validation {
    condition     = length(var.regions) > 0 && alltrue([for name, r in var.regions : can(regex("^[a-z][a-z0-9]*(-[a-z0-9]+)*$", name)) && length(name) <= 16])
    error_message = "Every region name must be lowercase letters, digits and single hyphens, start with a letter and not end with a hyphen (e.g. us-east, not us- or us--east), at most 16 characters."
  }

  validation {
    condition     = alltrue([for r in values(var.regions) : length(r.models) > 0 && r.model_latency_s > 0])
    error_message = "Every region must serve at least one model, and its model_latency_s must be > 0."
  }
}

variable "catalog_toml" {
  description = "Model catalog (TOML) for every region without its own catalog_toml; null serves the catalog built into the image."
  type        = string
  default     = null
}

variable "provider_secrets" {
  description = "Credentials of remote model providers, as environment variables (name => value) set from container app secrets in every region."
  type        = map(string)
  default     = {}
  sensitive   = true

  validation {
    condition     = alltrue([for name in keys(var.provider_secrets) : can(regex("^[A-Z]([A-Z0-9_]*[A-Z0-9])?$", name))])
    error_message = "provider_secrets names must be environment variable names (A-Z, 0-9, _, not ending with _)."
  }

  # Each becomes the container app secret lower(replace(NAME, "_", "-")):
  # API_KEYS, SENTRY_DSN and CATALOG_TOML would collide with the executor's
  # own secrets, and the env vars the executor sets must not be overwritten.
  validation {
    condition     = alltrue([for name in keys(var.provider_secrets) : !contains(["api-keys", "sentry-dsn", "catalog-toml"], lower(replace(name, "_", "-"))) && !contains(["PORT", "WEB_CONCURRENCY", "SENTRY_DSN"], name) && !startswith(name, "ES_") && !startswith(name, "GUNICORN_")])
    error_message = "provider_secrets must not be named API_KEYS, SENTRY_DSN, CATALOG_TOML, PORT, WEB_CONCURRENCY, or start with ES_ or GUNICORN_: the executor uses those names."
  }
}

variable "sentry_dsn" {
  description = "Sentry DSN for every region (a container app secret); empty turns Sentry off."
  type        = string
  default     = ""
  sensitive   = true
}

variable "sentry_dsn_key_vault_secret_id" {
  description = "Instead of sentry_dsn: versionless ID of a Key Vault secret holding it (needs key_vault_id, checked by a precondition in each region)."
  type        = string
  default     = null

  validation {
    condition     = var.sentry_dsn_key_vault_secret_id == null || can(regex("^https://[a-z0-9-]+\\.vault\\.[a-z0-9.]+/secrets/[A-Za-z0-9-]+/?$", var.sentry_dsn_key_vault_secret_id))
    error_message = "sentry_dsn_key_vault_secret_id must be a versionless Key Vault secret ID: https://<vault>.vault.azure.net/secrets/<name>."
  }
}

variable "key_vault_id" {
  description = "Key Vault of referenced secrets; each region's identity is made 'Key Vault Secrets User' on it."
  type        = string
  default     = null
}

variable "allowed_cidrs" {
  description = "If not empty, only these source ranges may call the executors (e.g. the dispatcher's outbound addresses)."
  type        = list(string)
  default     = []
}

variable "log_retention_days" {
  description = "Log Analytics retention in every region (30 to 730 days)."
  type        = number
  default     = 30

  validation {
    condition     = var.log_retention_days >= 30 && var.log_retention_days <= 730 && floor(var.log_retention_days) == var.log_retention_days
    error_message = "log_retention_days must be a whole number from 30 to 730 (the PerGB2018 workspace's range)."
  }
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "dispatcher" {
  description = <<-EOT
    Optional dispatcher in Azure: a container app and a PostgreSQL Flexible Server in a
    private network, given the regions file and the executors' keys by this configuration.
  EOT
  type = object({
    enabled       = optional(bool, false)
    location      = optional(string)
    command       = optional(list(string), ["executor-service", "dispatcher", "--host", "0.0.0.0", "--port", "8100"])
    port          = optional(number, 8100)
    min_replicas  = optional(number, 1)
    max_replicas  = optional(number, 2)
    postgres_sku  = optional(string, "GP_Standard_D2ds_v5")
    postgres_zone = optional(string) # null: Azure picks; "1".."3" only where the location has zones
  })
  default = {}
}
