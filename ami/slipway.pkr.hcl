# Slipway staging AMI: Debian 12 with the slipway binary, a hardened systemd unit, the identity
# volume's mount unit, default settings, sysctl, journald and the SSM agent (from its own
# regional S3 bucket, signature-verified against files/amazon-ssm-agent.gpg, which the operator
# saves first: docs/operations.md), installed by provision.sh. `make ami` builds it:
#
#   packer init ami/slipway.pkr.hcl
#   packer build -var region=eu-west-1 -var version=0.1.0 \
#       -var binary=target/release/slipway ami/slipway.pkr.hcl

packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type        = string
  description = "Region the AMI is built in (copy it elsewhere with `aws ec2 copy-image`)."
  default     = "eu-west-1"
}

variable "base_ami" {
  type        = string
  description = "Base AMI id; empty: the newest official Debian 12 image for var.architecture."
  default     = ""
}

variable "version" {
  type        = string
  description = "Slipway version, in the AMI name and tags."
}

variable "binary" {
  type        = string
  description = "The slipway binary to install (built for the AMI's architecture and glibc)."
  default     = "../target/release/slipway"
}

variable "architecture" {
  type        = string
  description = "x86_64 or arm64."
  default     = "x86_64"
}

variable "instance_type" {
  type        = string
  description = "Instance type of the temporary build instance."
  default     = "t3.small"
}

variable "subnet_id" {
  type        = string
  description = "Subnet of the build instance; empty: the default VPC."
  default     = ""
}

variable "kms_key_id" {
  type        = string
  description = "KMS key encrypting the AMI's snapshot; empty: the account's default EBS key."
  default     = ""
}

locals {
  stamp       = formatdate("YYYYMMDDhhmmss", timestamp())
  debian_arch = var.architecture == "arm64" ? "arm64" : "amd64"
}

source "amazon-ebs" "slipway" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id == "" ? null : var.subnet_id
  ssh_username  = "admin"
  ami_name      = "slipway-${var.version}-${var.architecture}-${local.stamp}"
  ami_description = "Slipway ${var.version} replication server (Debian 12)"

  source_ami = var.base_ami == "" ? null : var.base_ami
  dynamic "source_ami_filter" {
    for_each = var.base_ami == "" ? [1] : []
    content {
      filters = {
        name                = "debian-12-${local.debian_arch}-*"
        virtualization-type = "hvm"
        root-device-type    = "ebs"
      }
      owners      = ["136693071363"] # Debian
      most_recent = true
    }
  }

  encrypt_boot = true
  kms_key_id   = var.kms_key_id == "" ? null : var.kms_key_id
  ena_support  = true
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name              = "slipway ${var.version}"
    "slipway:version" = var.version
    "slipway:role"    = "ami"
  }
}

build {
  sources = ["source.amazon-ebs.slipway"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/slipway-ami/files"]
  }
  provisioner "file" {
    source      = var.binary
    destination = "/tmp/slipway-ami/slipway"
  }
  provisioner "file" {
    source      = "${path.root}/provision.sh"
    destination = "/tmp/slipway-ami/provision.sh"
  }
  provisioner "file" {
    source      = "${path.root}/files/"
    destination = "/tmp/slipway-ami/files"
  }
  provisioner "shell" {
    inline = [
      "chmod +x /tmp/slipway-ami/slipway /tmp/slipway-ami/provision.sh",
      "sudo SLIPWAY_SSM_REGION=${var.region} SLIPWAY_BINARY=/tmp/slipway-ami/slipway bash /tmp/slipway-ami/provision.sh",
      "sudo /usr/local/bin/slipway --version",
      "sudo systemd-analyze verify /usr/lib/systemd/system/slipway.service /usr/lib/systemd/system/slipway-identity.service",
      "sudo systemctl is-enabled amazon-ssm-agent.service slipway-identity.service slipway.service",
      "rm -rf /tmp/slipway-ami",
    ]
  }
}
