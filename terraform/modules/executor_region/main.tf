# One region's executor: its own resource group, Log Analytics workspace and
# Container Apps environment, a user-assigned identity that pulls the image
# from the shared registry, and the container app itself.

locals {
  app_name = "ca-${var.name_prefix}-${var.region}"

  # Model calls one worker process admits at once (ES_MAX_IN_FLIGHT): its
  # threads under gthread, the admission limit under gevent.
  calls_per_worker = var.worker_class == "gevent" ? var.gevent_max_in_flight : var.threads
  # What one replica serves at once. The HTTP scale rule adds a replica when
  # the average replica has this many requests in flight, i.e. exactly when
  # the next request would be answered 503 by the admission limit.
  concurrent_requests = var.workers * local.calls_per_worker

  # Gunicorn gives in-flight calls graceful_timeout seconds after SIGTERM, then
  # kills its workers and exits; the platform waits a little longer before
  # SIGKILL so the master's own exit is never cut short.
  termination_grace_period_s = var.graceful_timeout_s + 5

  # /health is answered by a worker thread: when every thread is busy with a
  # long model call the probe waits. Restart only once the probe has failed
  # for longer than gunicorn's own worker timeout (which already restarts a
  # stuck worker); a busy replica is not a dead one.
  liveness_interval_s = 10
  liveness_failures   = min(10, ceil(var.worker_timeout_s / local.liveness_interval_s) + 2)

  # Secrets are mounted as files here when a catalog is supplied (one file per
  # secret, named after it); ES_CATALOG names the catalog's file.
  secrets_mount   = "/etc/executor-service/secrets"
  catalog_secret  = "catalog-toml"
  mount_secrets   = var.catalog_toml != null
  sentry_from_kv  = var.sentry_dsn_key_vault_secret_id != null
  sentry_by_value = !local.sentry_from_kv && nonsensitive(var.sentry_dsn != "")
  # Only the names are revealed (to build the secret and env blocks), never the values.
  provider_secret_names = nonsensitive(toset(keys(var.provider_secrets)))

  tags = merge(var.tags, { region = var.region })
}

resource "azurerm_resource_group" "this" {
  name     = "rg-${var.name_prefix}-${var.region}"
  location = var.location
  tags     = local.tags
}

resource "azurerm_log_analytics_workspace" "this" {
  name                = "log-${var.name_prefix}-${var.region}"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  sku                 = "PerGB2018"
  retention_in_days   = var.log_retention_days
  tags                = local.tags
}

resource "azurerm_container_app_environment" "this" {
  name                       = "cae-${var.name_prefix}-${var.region}"
  location                   = var.location
  resource_group_name        = azurerm_resource_group.this.name
  logs_destination           = "log-analytics"
  log_analytics_workspace_id = azurerm_log_analytics_workspace.this.id
  tags                       = local.tags
}

# The app pulls its image with this identity: no registry admin user and no
# registry password anywhere.
resource "azurerm_user_assigned_identity" "this" {
  name                = "id-${var.name_prefix}-${var.region}"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  tags                = local.tags
}

resource "azurerm_role_assignment" "acr_pull" {
  scope                = var.registry_id
  role_definition_name = "AcrPull"
  principal_id         = azurerm_user_assigned_identity.this.principal_id
  # Skips the directory lookup that fails while a new identity replicates.
  principal_type = "ServicePrincipal"
}

resource "azurerm_role_assignment" "key_vault_secrets" {
  count = var.key_vault_id == null ? 0 : 1

  scope                = var.key_vault_id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.this.principal_id
  principal_type       = "ServicePrincipal"
}

resource "azurerm_container_app" "this" {
  name                         = local.app_name
  container_app_environment_id = azurerm_container_app_environment.this.id
  resource_group_name          = azurerm_resource_group.this.name
  # One revision at a time: a new image tag makes a new revision, which takes
  # the traffic once its readiness probe passes; the old one is then stopped.
  revision_mode          = "Single"
  max_inactive_revisions = 5
  tags                   = local.tags

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.this.id]
  }

  registry {
    server   = var.registry_login_server
    identity = azurerm_user_assigned_identity.this.id
  }

  # "tenant:key" as the app's ES_API_KEYS expects; the dispatcher is the tenant.
  secret {
    name  = "api-keys"
    value = "dispatcher:${var.api_key}"
  }

  dynamic "secret" {
    for_each = local.sentry_from_kv ? [var.sentry_dsn_key_vault_secret_id] : []
    content {
      name                = "sentry-dsn"
      identity            = azurerm_user_assigned_identity.this.id
      key_vault_secret_id = secret.value
    }
  }

  dynamic "secret" {
    for_each = local.sentry_by_value ? ["sentry-dsn"] : []
    content {
      name  = secret.value
      value = var.sentry_dsn
    }
  }

  dynamic "secret" {
    for_each = local.mount_secrets ? [local.catalog_secret] : []
    content {
      name  = secret.value
      value = var.catalog_toml
    }
  }

  dynamic "secret" {
    for_each = local.provider_secret_names
    content {
      name  = lower(replace(secret.value, "_", "-"))
      value = var.provider_secrets[secret.value]
    }
  }

  ingress {
    external_enabled           = true
    allow_insecure_connections = false
    target_port                = var.port
    # gunicorn speaks HTTP/1.1; TLS ends at the Container Apps ingress.
    transport = "http"

    traffic_weight {
      latest_revision = true
      percentage      = 100
    }

    dynamic "ip_security_restriction" {
      for_each = var.allowed_cidrs
      content {
        name             = "allow-${ip_security_restriction.key}"
        action           = "Allow"
        ip_address_range = ip_security_restriction.value
      }
    }
  }

  template {
    min_replicas                     = var.min_replicas
    max_replicas                     = var.max_replicas
    termination_grace_period_seconds = local.termination_grace_period_s

    http_scale_rule {
      name                = "in-flight-calls"
      concurrent_requests = tostring(local.concurrent_requests)
    }

    dynamic "volume" {
      for_each = local.mount_secrets ? ["secrets"] : []
      content {
        name         = volume.value
        storage_type = "Secret"
      }
    }

    container {
      name   = "executor"
      image  = var.image
      cpu    = var.cpu
      memory = "${var.memory_gib}Gi"

      env {
        name  = "PORT"
        value = tostring(var.port)
      }
      env {
        name  = "WEB_CONCURRENCY"
        value = tostring(var.workers)
      }
      env {
        name  = "GUNICORN_THREADS"
        value = tostring(var.threads)
      }
      env {
        name  = "GUNICORN_WORKER_CLASS"
        value = var.worker_class
      }
      env {
        name  = "GUNICORN_TIMEOUT"
        value = tostring(var.worker_timeout_s)
      }
      env {
        name  = "GUNICORN_GRACEFUL_TIMEOUT"
        value = tostring(var.graceful_timeout_s)
      }
      env {
        name  = "ES_MAX_IN_FLIGHT"
        value = tostring(local.calls_per_worker)
      }
      env {
        name  = "ES_REGION"
        value = var.region
      }
      env {
        name  = "ES_LOG_FORMAT"
        value = "json"
      }
      env {
        name  = "ES_SENTRY_ENVIRONMENT"
        value = var.sentry_environment
      }
      env {
        name        = "ES_API_KEYS"
        secret_name = "api-keys"
      }

      dynamic "env" {
        for_each = local.sentry_from_kv || local.sentry_by_value ? ["sentry-dsn"] : []
        content {
          name        = "SENTRY_DSN"
          secret_name = env.value
        }
      }

      dynamic "env" {
        for_each = local.mount_secrets ? [local.catalog_secret] : []
        content {
          name  = "ES_CATALOG"
          value = "${local.secrets_mount}/${env.value}"
        }
      }

      dynamic "env" {
        for_each = local.provider_secret_names
        content {
          name        = env.value
          secret_name = lower(replace(env.value, "_", "-"))
        }
      }

      dynamic "volume_mounts" {
        for_each = local.mount_secrets ? ["secrets"] : []
        content {
          name = volume_mounts.value
          path = local.secrets_mount
        }
      }

      # A worker answers only after post_worker_init has loaded every model,
      # so /health passing means the process is up; allow 60 s for that.
      startup_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = 2
        timeout                 = 3
        failure_count_threshold = 30
      }

      # /ready turns 503 while models load and as soon as SIGTERM starts the
      # drain, so a replica leaves the rotation before it stops.
      readiness_probe {
        transport               = "HTTP"
        path                    = "/ready"
        port                    = var.port
        interval_seconds        = 5
        timeout                 = 3
        failure_count_threshold = 2
        success_count_threshold = 1
      }

      liveness_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = local.liveness_interval_s
        timeout                 = 5
        failure_count_threshold = local.liveness_failures
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.cpu >= 0.25 && var.cpu <= 2 && floor(var.cpu * 4) == var.cpu * 4
      error_message = "cpu must be 0.25 to 2 in steps of 0.25 (Consumption profile)."
    }
    precondition {
      condition     = var.memory_gib == var.cpu * 2
      error_message = "memory_gib must be twice cpu (Consumption profile)."
    }
    # With memory at twice the vCPU, this also leaves every worker at least
    # 1 GiB for its own copy of the app and of any local model.
    precondition {
      condition     = var.workers <= var.cpu * 2
      error_message = "At most two gunicorn workers per vCPU: more only queue behind each other."
    }
    precondition {
      condition     = var.min_replicas >= 0 && var.min_replicas <= var.max_replicas
      error_message = "min_replicas must be between 0 and max_replicas."
    }
    precondition {
      condition     = local.termination_grace_period_s <= 600
      error_message = "graceful_timeout_s + 5 must not exceed 600 s, the Container Apps maximum."
    }
    precondition {
      condition     = local.liveness_interval_s * local.liveness_failures > var.worker_timeout_s
      error_message = "The liveness probe must tolerate a busy replica longer than gunicorn's worker timeout."
    }
  }

  # The image pull and the Key Vault reference need the roles to exist first.
  depends_on = [
    azurerm_role_assignment.acr_pull,
    azurerm_role_assignment.key_vault_secrets,
  ]
}
