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
  }

  # State holds the generated API keys and the database password: keep it in
  # a storage account (encrypted, access by Entra ID), never on a laptop.
  # Filled in at `terraform init -backend-config=...`, see docs/deploy.md.
  backend "azurerm" {}
}

provider "azurerm" {
  features {}
  # null: taken from ARM_SUBSCRIPTION_ID or the Azure CLI login.
  subscription_id = var.subscription_id
  # Data-plane access to storage by Entra ID, not by shared keys.
  storage_use_azuread = true
}
