# The dispatcher in Azure (optional): a container app running the dispatcher
# from the same image, and the PostgreSQL Flexible Server it keeps jobs in,
# reachable only inside a private network. The regions file and every
# executor's key come from the root module, never from a person.

locals {
  app_name      = "ca-${var.name_prefix}-dispatcher"
  secrets_mount = "/etc/executor-service/secrets"
  database_name = "dispatcher"
  # Only the environment variable names are revealed, never the keys.
  region_key_envs = nonsensitive(toset(keys(var.region_api_keys)))
  sentry_enabled  = nonsensitive(var.sentry_dsn != "")
  tags            = merge(var.tags, { role = "dispatcher" })
}

resource "azurerm_resource_group" "this" {
  name     = "rg-${var.name_prefix}-dispatcher"
  location = var.location
  tags     = local.tags
}

resource "azurerm_log_analytics_workspace" "this" {
  name                = "log-${var.name_prefix}-dispatcher"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  sku                 = "PerGB2018"
  retention_in_days   = var.log_retention_days
  tags                = local.tags
}

# ------------------------------------------------------------- network ---

resource "azurerm_virtual_network" "this" {
  name                = "vnet-${var.name_prefix}-dispatcher"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  address_space       = [var.vnet_address_space]
  tags                = local.tags
}

# A workload-profiles Container Apps environment needs a subnet of its own
# (/27 or larger; this is a /23), delegated to Microsoft.App/environments.
resource "azurerm_subnet" "apps" {
  #checkov:skip=CKV2_AZURE_31:The Container Apps platform manages this subnet's load balancer and rules; an NSG here must re-allow the platform's own traffic and adds nothing the ingress (HTTPS only) does not enforce.
  name                 = "snet-apps"
  resource_group_name  = azurerm_resource_group.this.name
  virtual_network_name = azurerm_virtual_network.this.name
  address_prefixes     = [cidrsubnet(var.vnet_address_space, 1, 0)]

  delegation {
    name = "container-apps"
    service_delegation {
      name    = "Microsoft.App/environments"
      actions = ["Microsoft.Network/virtualNetworks/subnets/join/action"]
    }
  }
}

resource "azurerm_subnet" "postgres" {
  #checkov:skip=CKV2_AZURE_31:Delegated to PostgreSQL Flexible Server, which has no public endpoint; only the apps subnet of this private network can reach it.
  name                 = "snet-postgres"
  resource_group_name  = azurerm_resource_group.this.name
  virtual_network_name = azurerm_virtual_network.this.name
  address_prefixes     = [cidrsubnet(var.vnet_address_space, 2, 2)]

  delegation {
    name = "postgres-flexible"
    service_delegation {
      name    = "Microsoft.DBforPostgreSQL/flexibleServers"
      actions = ["Microsoft.Network/virtualNetworks/subnets/join/action"]
    }
  }
}

resource "azurerm_private_dns_zone" "postgres" {
  name                = "${var.name_prefix}-dispatcher.private.postgres.database.azure.com"
  resource_group_name = azurerm_resource_group.this.name
  tags                = local.tags
}

resource "azurerm_private_dns_zone_virtual_network_link" "postgres" {
  name                  = "postgres"
  private_dns_zone_name = azurerm_private_dns_zone.postgres.name
  virtual_network_id    = azurerm_virtual_network.this.id
  resource_group_name   = azurerm_resource_group.this.name
  registration_enabled  = false
  tags                  = local.tags
}

# ------------------------------------------------------------ database ---

resource "random_password" "postgres_admin" {
  length      = 40
  special     = false
  min_upper   = 2
  min_lower   = 2
  min_numeric = 2
}

# Flexible Server names are global (<name>.postgres.database.azure.com): a
# random suffix keeps two deployments, or a re-create, apart.
resource "random_string" "postgres_suffix" {
  length  = 6
  upper   = false
  special = false
}

resource "azurerm_postgresql_flexible_server" "this" {
  #checkov:skip=CKV2_AZURE_57:Private access by VNet integration (delegated subnet, private DNS zone, public access off); Flexible Server cannot have private endpoints when it is VNet-integrated.
  name                          = "psql-${var.name_prefix}-dispatcher-${random_string.postgres_suffix.result}"
  resource_group_name           = azurerm_resource_group.this.name
  location                      = var.location
  version                       = var.postgres_version
  sku_name                      = var.postgres_sku
  storage_mb                    = var.postgres_storage_mb
  zone                          = var.postgres_zone
  delegated_subnet_id           = azurerm_subnet.postgres.id
  private_dns_zone_id           = azurerm_private_dns_zone.postgres.id
  public_network_access_enabled = false
  administrator_login           = "dispatcher"
  administrator_password        = random_password.postgres_admin.result
  backup_retention_days         = 14
  geo_redundant_backup_enabled  = true
  tags                          = local.tags

  authentication {
    password_auth_enabled = true
  }

  lifecycle {
    # null zone: Azure picks one (and none where the location has no zones).
    # Azure may move the server to another zone after a failover.
    ignore_changes = [zone]
  }

  depends_on = [azurerm_private_dns_zone_virtual_network_link.postgres]
}

resource "azurerm_postgresql_flexible_server_database" "this" {
  name      = local.database_name
  server_id = azurerm_postgresql_flexible_server.this.id
  charset   = "UTF8"
  collation = "en_US.utf8"
}

# ---------------------------------------------------------- container app ---

resource "azurerm_container_app_environment" "this" {
  name                       = "cae-${var.name_prefix}-dispatcher"
  location                   = var.location
  resource_group_name        = azurerm_resource_group.this.name
  infrastructure_subnet_id   = azurerm_subnet.apps.id
  logs_destination           = "log-analytics"
  log_analytics_workspace_id = azurerm_log_analytics_workspace.this.id
  tags                       = local.tags

  # See modules/executor_region: Consumption billing, profiles addable later.
  workload_profile {
    name                  = "Consumption"
    workload_profile_type = "Consumption"
  }
}

resource "azurerm_user_assigned_identity" "this" {
  name                = "id-${var.name_prefix}-dispatcher"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  tags                = local.tags
}

resource "azurerm_role_assignment" "acr_pull" {
  scope                = var.registry_id
  role_definition_name = "AcrPull"
  principal_id         = azurerm_user_assigned_identity.this.principal_id
  principal_type       = "ServicePrincipal"
}

# See modules/executor_region: the image pull needs AcrPull to have propagated.
resource "time_sleep" "role_propagation" {
  create_duration = "${var.role_propagation_wait_s}s"

  triggers = {
    acr_pull = azurerm_role_assignment.acr_pull.id
  }
}

# The key clients present to the dispatcher's job API.
resource "random_password" "api_key" {
  length  = 48
  special = false
}

resource "azurerm_container_app" "this" {
  name                         = local.app_name
  container_app_environment_id = azurerm_container_app_environment.this.id
  resource_group_name          = azurerm_resource_group.this.name
  workload_profile_name        = "Consumption"
  revision_mode                = "Single"
  tags                         = local.tags

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.this.id]
  }

  registry {
    server   = var.registry_login_server
    identity = azurerm_user_assigned_identity.this.id
  }

  secret {
    name  = "database-url"
    value = "postgresql://dispatcher:${random_password.postgres_admin.result}@${azurerm_postgresql_flexible_server.this.fqdn}:5432/${local.database_name}?sslmode=require"
  }

  secret {
    name  = "api-keys"
    value = "clients:${random_password.api_key.result}"
  }

  # Mounted as a file (see the volume below); ES_REGIONS_FILE names it.
  secret {
    name  = "regions-toml"
    value = var.regions_toml
  }

  dynamic "secret" {
    for_each = local.region_key_envs
    content {
      name  = lower(replace(secret.value, "_", "-"))
      value = var.region_api_keys[secret.value]
    }
  }

  dynamic "secret" {
    for_each = local.sentry_enabled ? ["sentry-dsn"] : []
    content {
      name  = secret.value
      value = var.sentry_dsn
    }
  }

  ingress {
    external_enabled           = true
    allow_insecure_connections = false
    target_port                = var.port
    transport                  = "http"

    traffic_weight {
      latest_revision = true
      percentage      = 100
    }
  }

  template {
    min_replicas = var.min_replicas
    max_replicas = var.max_replicas
    # SIGTERM: stop claiming, let calls in flight finish for shutdown_grace_s,
    # release the rest, stop the API (it waits grace + 5 s), exit.
    termination_grace_period_seconds = var.shutdown_grace_s + 15

    volume {
      name         = "secrets"
      storage_type = "Secret"
    }

    container {
      name    = "dispatcher"
      image   = var.image
      command = var.command
      cpu     = var.cpu
      memory  = "${var.memory_gib}Gi"

      env {
        name  = "ES_SHUTDOWN_GRACE_S"
        value = tostring(var.shutdown_grace_s)
      }
      env {
        name  = "ES_REGIONS_FILE"
        value = "${local.secrets_mount}/regions-toml"
      }
      env {
        name  = "ES_LOG_FORMAT"
        value = "json"
      }
      env {
        name        = "ES_DATABASE_URL"
        secret_name = "database-url"
      }
      env {
        name        = "ES_API_KEYS"
        secret_name = "api-keys"
      }

      dynamic "env" {
        for_each = local.region_key_envs
        content {
          name        = env.value
          secret_name = lower(replace(env.value, "_", "-"))
        }
      }

      dynamic "env" {
        for_each = local.sentry_enabled ? ["sentry-dsn"] : []
        content {
          name        = "SENTRY_DSN"
          secret_name = env.value
        }
      }

      # The regions file alone: the database URL and the keys stay env-only.
      volume_mounts {
        name     = "secrets"
        path     = "${local.secrets_mount}/regions-toml"
        sub_path = "regions-toml"
      }

      startup_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = 2
        timeout                 = 3
        failure_count_threshold = 30
      }

      # The API's gunicorn workers also serve batch uploads and result
      # exports, which can take seconds: a probe answered late is a success.
      readiness_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = 5
        timeout                 = 30
        failure_count_threshold = 3
        success_count_threshold = 1
      }

      liveness_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = 10
        timeout                 = 30
        failure_count_threshold = 6
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.min_replicas >= 1 && var.min_replicas <= var.max_replicas
      error_message = "The dispatcher must keep at least one replica: it claims work without being called."
    }
    precondition {
      condition     = var.memory_gib == var.cpu * 2
      error_message = "memory_gib must be twice cpu (Consumption profile)."
    }
    precondition {
      condition     = contains(var.command, tostring(var.port))
      error_message = "The dispatcher's command must listen on var.port, where ingress and probes point."
    }
  }

  depends_on = [
    time_sleep.role_propagation,
    azurerm_postgresql_flexible_server_database.this,
  ]
}
