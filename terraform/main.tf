# Executors in several Azure regions, one Container App per region, all
# pulling one image from one geo-replicated registry. The dispatcher's regions
# file is an output of this configuration (see outputs.tf).

locals {
  tags = merge({ project = "executor-service", managed_by = "terraform" }, var.tags)

  image = "${azurerm_container_registry.this.login_server}/${var.image_repository}:${var.image_tag}"

  # Every location a region runs in, other than the registry's home, gets a
  # replica: each region pulls its image from its own location. Azure takes
  # "East US" and "eastus" for the same location, and so must this
  # comparison: a replica in the registry's own location is refused.
  registry_home = lower(replace(var.registry_location, " ", ""))

  registry_replica_locations = toset([
    for location in distinct([for r in values(var.regions) : lower(replace(r.location, " ", ""))]) : location
    if location != local.registry_home
  ])

  # The environment variable that carries each executor's key to the dispatcher.
  api_key_env = {
    for name in keys(var.regions) : name => "ES_REGION_${upper(replace(name, "-", "_"))}_KEY"
  }

  # What the dispatcher needs per region; rendered as its regions file.
  dispatcher_regions = {
    for name, r in var.regions : name => {
      url = module.executor_region[name].url
      # Enough to keep every replica up to max_replicas busy, which is what
      # makes the HTTP scale rule scale out; capped at the dispatcher's limit.
      concurrency = coalesce(
        r.dispatcher_concurrency,
        min(1024, module.executor_region[name].concurrent_requests * r.max_replicas),
      )
      models      = r.models
      api_key_env = local.api_key_env[name]
    }
  }

  regions_file = templatefile("${path.module}/templates/regions.toml.tftpl", {
    regions = local.dispatcher_regions
  })
}

resource "azurerm_resource_group" "shared" {
  name     = "rg-${var.name_prefix}-shared"
  location = var.registry_location
  tags     = local.tags
}

# Registry names are global: a random suffix keeps two deployments apart.
resource "random_string" "registry_suffix" {
  length  = 6
  upper   = false
  special = false
}

resource "azurerm_container_registry" "this" {
  #checkov:skip=CKV_AZURE_139:Executors run in Consumption environments without a virtual network in three regions and pull over the public endpoint, authenticated by their managed identity (admin user off, anonymous pull off); az acr build needs it too. Private endpoints would need a VNet per region.
  #checkov:skip=CKV_AZURE_166:Quarantine holds every pushed image until a scanner releases it; this deployment has no such scanner, so every rollout would hang. Scan in CI before the push instead.
  #checkov:skip=CKV_AZURE_164:Docker Content Trust is being retired by Azure in favour of Notary v2 signatures; sign images with notation in CI instead.
  #checkov:skip=CKV_AZURE_233:Zone redundancy is var.registry_zone_redundancy (default true): Azure refuses it in locations without availability zones, so it must be possible to turn it off; checkov does not resolve the variable.
  name                          = "${var.name_prefix}acr${random_string.registry_suffix.result}"
  resource_group_name           = azurerm_resource_group.shared.name
  location                      = local.registry_home
  sku                           = "Premium"
  admin_enabled                 = false
  anonymous_pull_enabled        = false
  public_network_access_enabled = true
  data_endpoint_enabled         = true
  zone_redundancy_enabled       = var.registry_zone_redundancy
  # Untagged manifests (overwritten tags) are deleted after a week.
  retention_policy_in_days = 7
  tags                     = local.tags

  dynamic "georeplications" {
    for_each = local.registry_replica_locations
    content {
      location                  = georeplications.value
      regional_endpoint_enabled = true
      zone_redundancy_enabled   = var.registry_zone_redundancy
      tags                      = local.tags
    }
  }
}

# One key per executor, generated here so no one types or copies it.
resource "random_password" "executor_api_key" {
  for_each = var.regions

  length  = 48
  special = false
}

module "executor_region" {
  source   = "./modules/executor_region"
  for_each = var.regions

  region      = each.key
  location    = each.value.location
  name_prefix = var.name_prefix
  tags        = local.tags

  image                 = local.image
  registry_id           = azurerm_container_registry.this.id
  registry_login_server = azurerm_container_registry.this.login_server

  api_key                        = random_password.executor_api_key[each.key].result
  sentry_dsn                     = var.sentry_dsn
  sentry_dsn_key_vault_secret_id = var.sentry_dsn_key_vault_secret_id
  key_vault_id                   = var.key_vault_id
  catalog_toml                   = try(coalesce(each.value.catalog_toml, var.catalog_toml), null)
  provider_secrets               = var.provider_secrets
  models                         = each.value.models

  workers      = each.value.workers
  threads      = each.value.threads
  worker_class = each.value.worker_class
  cpu          = each.value.cpu
  memory_gib   = each.value.memory_gib
  min_replicas = each.value.min_replicas
  max_replicas = each.value.max_replicas

  model_latency_s         = each.value.model_latency_s
  role_propagation_wait_s = var.role_propagation_wait_s

  allowed_cidrs      = var.allowed_cidrs
  log_retention_days = var.log_retention_days
}

module "dispatcher" {
  source = "./modules/dispatcher"
  count  = var.dispatcher.enabled ? 1 : 0

  name_prefix = var.name_prefix
  location    = coalesce(var.dispatcher.location, var.registry_location)
  tags        = local.tags

  image                 = local.image
  registry_id           = azurerm_container_registry.this.id
  registry_login_server = azurerm_container_registry.this.login_server
  command               = var.dispatcher.command
  port                  = var.dispatcher.port
  min_replicas          = var.dispatcher.min_replicas
  max_replicas          = var.dispatcher.max_replicas
  postgres_sku          = var.dispatcher.postgres_sku
  postgres_zone         = var.dispatcher.postgres_zone

  regions_toml = local.regions_file
  region_api_keys = {
    for name in keys(var.regions) : local.api_key_env[name] => random_password.executor_api_key[name].result
  }
  sentry_dsn              = var.sentry_dsn
  log_retention_days      = var.log_retention_days
  role_propagation_wait_s = var.role_propagation_wait_s
}
