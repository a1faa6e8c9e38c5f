variable "subscription_id" {
  description = "Azure subscription; null takes ARM_SUBSCRIPTION_ID or the Azure CLI's current one."
  type        = string
  default     = null
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
  description = "Home location of the container registry (and of the shared resource group); every other region location gets a geo-replica."
  type        = string
  default     = "eastus"
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
    memory per replica, a region-specific catalog, and the dispatcher's concurrency
    for the region (default: calls per replica x max_replicas).
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

  validation {
    condition     = length(var.regions) > 0 && alltrue([for name, r in var.regions : can(regex("^[a-z][a-z0-9-]{0,15}$", name)) && length(r.models) > 0])
    error_message = "Every region name must be lowercase letters, digits and '-' (at most 16 characters), and every region must serve at least one model."
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
    condition     = alltrue([for name in keys(var.provider_secrets) : can(regex("^[A-Z][A-Z0-9_]*$", name))])
    error_message = "provider_secrets names must be environment variable names (A-Z, 0-9, _)."
  }
}

variable "sentry_dsn" {
  description = "Sentry DSN for every region (a container app secret); empty turns Sentry off."
  type        = string
  default     = ""
  sensitive   = true
}

variable "sentry_dsn_key_vault_secret_id" {
  description = "Instead of sentry_dsn: versionless ID of a Key Vault secret holding it (needs key_vault_id)."
  type        = string
  default     = null
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
  description = "Log Analytics retention in every region."
  type        = number
  default     = 30
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
    postgres_zone = optional(string, "1")
  })
  default = {}
}
