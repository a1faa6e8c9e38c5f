terraform {
  required_version = ">= 1.6, < 2.0"

  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.40"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
    # time_sleep: the wait for role assignments to propagate (modules/*/main.tf).
    time = {
      source  = "hashicorp/time"
      version = "~> 0.12"
    }
  }

  # State holds the generated API keys and the database password: keep it in
  # a storage account (encrypted, access by Entra ID), never on a laptop.
  # Filled in at `terraform init -backend-config=...`, see docs/deploy.md.
  backend "azurerm" {}
}

provider "azurerm" {
  features {}
  # null: taken from ARM_SUBSCRIPTION_ID. Since azurerm 4.0 one of the two is
  # required: the provider no longer falls back to the Azure CLI's current
  # subscription (see docs/deploy.md, "Prerequisites").
  subscription_id = var.subscription_id

  # azurerm 4's default set ("legacy") does not contain Microsoft.App, so a
  # fresh subscription fails at the first Container Apps environment. Register
  # the core set plus exactly what this configuration creates. This is the
  # provider's own registration (before every plan and apply, a no-op once
  # registered), not azurerm_resource_provider_registration: that resource
  # fails when the provider is already registered unless imported, and it
  # unregisters the provider on destroy, under every other app of the
  # subscription.
  resource_provider_registrations = "core"
  resource_providers_to_register = [
    "Microsoft.App",
    "Microsoft.ContainerRegistry",
    "Microsoft.DBforPostgreSQL",
    "Microsoft.OperationalInsights",
  ]
  # Data-plane access to storage by Entra ID, not by shared keys.
  storage_use_azuread = true
}
